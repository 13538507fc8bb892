"""Feature terms (FitNet, AT, NST, VID, ProjectorKD, SRD): alone on hand-built outputs each is its functional loss ×
weight (× ramp), reads its features by name, rebuilds from its spec (built parts: the same output once their
state is loaded), and checkpoints written before the terms existed still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses import at_loss, fitnet_loss, logsum_distance, nst_loss, vid_loss
from lightning_kd.methods import VID, Batch, DistillationModule, FitNet, ModelOutput, ProjectorKD
from lightning_kd.terms import (
    ATTerm,
    FitNetTerm,
    KDTerm,
    NSTTerm,
    ProjectorKDTerm,
    SRDTerm,
    VIDTerm,
    term_from_spec,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
#: feature shapes of cnn_tiny (student) and cnn_small (teacher) on 1×8×8 inputs, without the batch dimension
STUDENT_SHAPES = {"stages.0": (8, 8, 8), "stages.1": (16, 4, 4), "pool": (16,)}
TEACHER_SHAPES = {"stages.0": (16, 8, 8), "stages.1": (32, 4, 4), "pool": (32,)}
STAGES = ["stages.0", "stages.1"]
BATCH = Batch(torch.zeros(6, 1, 8, 8), torch.arange(6))


class Host(DistillationModule):
    """A host whose epoch the test sets."""

    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def attach(name: str, term, seed: int = 0) -> Host:
    torch.manual_seed(seed)
    host = Host(**TINY)
    host.add_term(name, term)
    return host


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outputs(term, batch_size: int = 6) -> tuple[ModelOutput, ModelOutput]:
    """Student and teacher outputs holding a random feature of the right shape under each of the term's layers."""
    student = {name: randn(batch_size, *STUDENT_SHAPES[name], seed=i) for i, name in enumerate(term.student_layers)}
    teacher = {name: randn(batch_size, *TEACHER_SHAPES[name], seed=10 + i)
               for i, name in enumerate(term.teacher_layers)}
    return ModelOutput(randn(batch_size, 10, seed=20), student), ModelOutput(randn(batch_size, 10, seed=21), teacher)


def shuffled(out: ModelOutput) -> ModelOutput:
    """The same features in reverse order, with extra entries before and after them."""
    first, last = randn(6, 3, seed=30), randn(6, 7, 2, 2, seed=31)
    return ModelOutput(out.logits, {"extra.first": first, **dict(reversed(out.features.items())), "extra.last": last})


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, training=True, eps=1e-4)


def fitnet_expected(term, s, t, *_):
    return {"fitnet": fitnet_loss(term.projector(s[0]), t[0])}


def at_expected(term, s, t, *_):
    return {"at": sum(at_loss(a, b, 3.0) for a, b in zip(s, t))}


def nst_expected(term, s, t, *_):
    return {"nst": sum(nst_loss(a, b) for a, b in zip(s, t))}


def vid_expected(term, s, t, *_):
    return {"vid": sum(vid_loss(r(a), b, r.variance()) for r, a, b in zip(term.regressors, s, t))}


def projectorkd_expected(term, s, t, *_):
    student = s[0].mean((2, 3)) if s[0].dim() == 4 else s[0]
    return {"logsum": logsum_distance(batch_norm(term.projector(student)), batch_norm(t[0]), 3.0)}


def srd_expected(term, s, t, teacher_logits, host):
    connected = term.projector(s[0])
    return {"fm": 2.0 * fitnet_loss(connected, t[0]),
            "sr": 0.5 * F.mse_loss(host.teacher.fc(connected), teacher_logits)}


CASES = {
    "fitnet": (lambda **kw: FitNetTerm(hint_layer=1, **kw), fitnet_expected),
    "at": (lambda **kw: ATTerm(3.0, STAGES, STAGES, **kw), at_expected),
    "nst": (lambda **kw: NSTTerm(STAGES, STAGES, **kw), nst_expected),
    "vid": (lambda **kw: VIDTerm(2.0, STAGES, STAGES, **kw), vid_expected),
    "projectorkd": (lambda **kw: ProjectorKDTerm(alpha=3.0, **kw), projectorkd_expected),
    "projectorkd_map": (lambda **kw: ProjectorKDTerm(3.0, 1e-4, "stages.1", **kw), projectorkd_expected),
    "srd": (lambda **kw: SRDTerm(2.0, 0.5, **kw), srd_expected),
}


@pytest.mark.parametrize("name", list(CASES))
def test_term_is_the_functional_loss_times_weight_and_ramp(name):
    make, expected_losses = CASES[name]
    term = make(weight=1.5, warmup_epochs=4)
    host = attach(name, term)
    student_out, teacher_out = outputs(term)
    s, t = list(student_out.features.values()), list(teacher_out.features.values())
    expected = expected_losses(term, s, t, teacher_out.logits, host)
    assert all(value > 0 for value in expected.values())
    for epoch, ramp in ((0, 0.25), (1, 0.5), (3, 1.0), (40, 1.0)):
        host.epoch_now = epoch
        losses = term(BATCH, student_out, teacher_out)
        assert set(losses) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(losses[key], 1.5 * ramp * value, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_term_reads_its_features_by_name(name):
    make, _ = CASES[name]
    term = make(weight=2.0)
    host = attach(name, term)  # noqa: F841  (terms hold their hosts weakly)
    student_out, teacher_out = outputs(term)
    plain = term(BATCH, student_out, teacher_out)
    torch.testing.assert_close(term(BATCH, shuffled(student_out), shuffled(teacher_out)), plain)


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip_and_state(name):
    make, _ = CASES[name]
    term = make(weight=2.0, warmup_epochs=3)
    spec = term.spec()
    clone = term_from_spec(spec)
    assert type(clone) is type(term) and clone.spec() == spec
    assert (spec["init_args"]["weight"], spec["init_args"]["warmup_epochs"]) == (2.0, 3)
    hosts = attach(name, term, seed=0), attach(name, clone, seed=1)
    hosts[1].teacher.load_state_dict(hosts[0].teacher.state_dict())  # SRD reads the teacher's classifier
    assert (clone.student_layers, clone.teacher_layers) == (term.student_layers, term.teacher_layers)
    student_out, teacher_out = outputs(term)
    trained = dict(term.state_dict())
    if trained:  # built parts: initialised differently, equal once the state is loaded
        before = clone(BATCH, student_out, teacher_out)
        assert any(not torch.allclose(before[k], v) for k, v in term(BATCH, student_out, teacher_out).items())
        clone.load_state_dict(trained)
    torch.testing.assert_close(clone(BATCH, student_out, teacher_out), term(BATCH, student_out, teacher_out))


def test_built_parts_are_sized_from_the_features():
    host = attach("vid", VIDTerm(student_layers=["stages.0"], teacher_layers=["stages.1"]))
    regressor, = host.terms["vid"].regressors
    assert (regressor.regressor[0].in_channels, regressor.regressor[-1].out_channels) == (8, 32)
    projector = attach("projectorkd", ProjectorKDTerm()).terms["projectorkd"].projector
    assert (projector.linear.in_features, projector.linear.out_features) == (16, 32)
    srd = attach("srd", SRDTerm()).terms["srd"]
    assert srd.teacher_classifier_name == "fc"
    assert (srd.projector.conv.in_channels, srd.projector.conv.out_channels) == (16, 32)


def test_unbuilt_terms_wait_for_shapes_and_say_so():
    host = DistillationModule(**{**TINY, "input_shape": None})
    term = host.add_term("vid", VIDTerm())
    assert not term.built and term.regressors is None
    with pytest.raises(RuntimeError, match="VIDTerm's trainable parts are not built: pass input_shape"):
        term(BATCH, *outputs(term))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"VID regresses \(N, C, H, W\) feature maps, but layer 'pool' gives shape "
                                         r"\(2, 16\)"):
        attach("vid", VIDTerm(student_layers=["pool"], teacher_layers=["pool"]))
    with pytest.raises(ValueError, match=r"SRD connects \(N, C\) embeddings, got student \(2, 16, 4, 4\)"):
        attach("srd", SRDTerm(student_layer="stages.1"))
    with pytest.raises(ValueError, match="the teacher .* has no module 'head'"):
        attach("srd", SRDTerm(teacher_classifier="head"))
    with pytest.raises(ValueError, match="NST pairs student and teacher layers in order.*1 student.*2 teacher"):
        attach("nst", NSTTerm(["stages.1"], STAGES))


def test_methods_combine_their_terms():
    model = ProjectorKD(**TINY, feat_weight=3.0, kd_weight=0.5, temperature=2.0)
    assert {name: type(term) for name, term in model.terms.items()} == {"projectorkd": ProjectorKDTerm,
                                                                         "kd": KDTerm}
    assert (model.terms["projectorkd"].weight, model.terms["kd"].weight, model.terms["kd"].temperature) == (
        3.0, 0.5, 2.0)
    assert model.projector is model.terms["projectorkd"].projector
    assert list(ProjectorKD(**TINY, kd_weight=0).terms) == ["projectorkd"], "kd_weight=0 disables the KD term"


# ------------------------------------------------------------------------------------ checkpoints before terms
@pytest.mark.parametrize("method, part, term", [(VID, "regressors", "vid"), (FitNet, "projector", "fitnet")])
def test_checkpoint_written_before_terms_loads_strictly(method, part, term, monkeypatch):
    monkeypatch.chdir(ROOT)  # the checkpoint names its teacher weights relative to the repository root
    path = f"tests/methods/legacy/{method.__name__}.ckpt"
    stored = torch.load(path, weights_only=True)["state_dict"]
    old = {key[len(part) + 1:]: value for key, value in stored.items() if key.startswith(f"{part}.")}
    assert old, f"the legacy checkpoint holds {part} at the top level"
    model = method.load_from_checkpoint(path, strict=True)
    loaded = getattr(model, part).state_dict()
    assert loaded.keys() == old.keys()
    for key, value in old.items():
        assert torch.equal(loaded[key], value), key
    assert all(f"terms.{term}.{part}.{key}" in model.state_dict() for key in old)
