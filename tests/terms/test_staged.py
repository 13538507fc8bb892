"""Terms with an init phase (FSP, AB, FT): alone on hand-built outputs each init loss is its functional loss × the
term's init weight and each main-phase loss its functional loss × weight × ramp; they read features by name, rebuild
from their spec (built parts included), name the parts their host trains and fixes, refuse a host without an init
phase, and checkpoints written when the parts sat on the method load into the terms."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_kd.features import feature_shapes
from lightning_kd.losses.feature import ab_loss, fsp_loss, fsp_matrix, ft_loss
from lightning_kd.methods import DistillationModule
from lightning_kd.methods.base import Batch, ModelOutput
from lightning_kd.methods.fsp import FSP
from lightning_kd.methods.ft import FT
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.terms import ABTerm, FSPTerm, FTTerm, term_from_spec

TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
SHAPE = (1, 8, 8)
TWO_STAGES = dict(student_layers=["stages.0", "stages.1"], teacher_layers=["stages.0", "stages.1"])


class Host(InitPhaseDistillation):
    """An init-phase host whose epoch the test sets."""

    epoch_now = 0

    def __init__(self, **kwargs):
        super().__init__(**TINY, init_epochs=1, init_lr=0.1, input_shape=SHAPE, **kwargs)

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def attach(name: str, term) -> Host:
    torch.manual_seed(0)
    host = Host()
    host.add_term(name, term)
    return host


def outputs(host: Host, term, seed: int = 0, extra: bool = False) -> tuple[ModelOutput, ModelOutput]:
    """Random features of the shapes of the term's layers (4 samples); with ``extra``, more entries first and the
    term's own in reverse order."""
    generator = torch.Generator().manual_seed(seed)

    def features(model, names):
        shapes = feature_shapes(model, names, SHAPE)
        feats = {name: torch.randn(4, *shapes[name][1:], generator=generator) for name in names}
        if extra:
            feats = {"decoy": torch.randn(4, 3), **dict(reversed(list(feats.items())))}
        return feats

    logits = torch.zeros(4, 10)
    return (ModelOutput(logits, features(host.student, term.student_layers)),
            ModelOutput(logits, features(host.teacher, term.teacher_layers)))


BATCH = Batch(torch.zeros(4, *SHAPE), torch.zeros(4, dtype=torch.long))


def fsp_expected(term, s, t):
    student = [c(s.features[n]) for c, n in zip(term.connectors, term.student_layers)]
    teacher = [t.features[n] for n in term.teacher_layers]
    return sum(fsp_loss(fsp_matrix(student[i], student[i + 1]), fsp_matrix(teacher[i], teacher[i + 1]))
               for i in range(len(student) - 1))


def ab_expected(term, s, t, margin):
    pairs = list(zip(term.connectors, term.student_layers, term.teacher_layers))
    return sum(2.0 ** (i - len(pairs) + 1) * ab_loss(c(s.features[a]), t.features[b], margin)
               for i, (c, a, b) in enumerate(pairs))


def test_fsp_term_init_loss_is_the_functional_loss_times_weight_and_no_loss_after():
    term = FSPTerm(weight=2.5)
    host = attach("fsp", term)
    assert term.student_layers == term.teacher_layers == ["stages.0", "stages.1"]
    assert [(c.conv.in_channels, c.conv.out_channels) for c in term.connectors] == [(8, 16), (16, 32)]
    s, t = outputs(host, term)
    expected = fsp_expected(term, s, t)
    assert expected > 0
    init = term.init_forward(BATCH, s, t)
    assert set(init) == {"fsp"}
    torch.testing.assert_close(init["fsp"], 2.5 * expected)
    torch.testing.assert_close(term.init_losses(BATCH, s, t)["fsp"], expected)
    assert term(BATCH, s, t) == {}, "after the init phase: cross-entropy alone"


def test_ab_term_init_loss_is_the_stage_weighted_functional_loss_times_weight():
    term = ABTerm(0.5, **TWO_STAGES, weight=0.7)
    host = attach("ab", term)
    s, t = outputs(host, term, seed=1)
    expected = ab_expected(term, s, t, 0.5)
    # the stage weights 1/2 and 1, written out
    c0, c1 = term.connectors
    by_hand = 0.5 * ab_loss(c0(s.features["stages.0"]), t.features["stages.0"], 0.5) + \
        ab_loss(c1(s.features["stages.1"]), t.features["stages.1"], 0.5)
    torch.testing.assert_close(expected, by_hand)
    assert expected > 0
    init = term.init_forward(BATCH, s, t)
    assert set(init) == {"ab"}
    torch.testing.assert_close(init["ab"], 0.7 * expected)
    assert term(BATCH, s, t) == {}


def test_ft_term_main_loss_is_weighted_and_ramped_and_the_reconstruction_is_not():
    term = FTTerm(0.5, 2.0, None, weight=3.0, warmup_epochs=4)
    host = attach("ft", term)
    s, t = outputs(host, term, seed=2)
    teacher_feat, student_feat = t.features["stages.1"], s.features["stages.1"]
    expected = ft_loss(term.translator(student_feat), term.paraphraser.encode(teacher_feat), 2.0, None)
    assert expected > 0
    for epoch, ramp in ((0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)):
        host.epoch_now = epoch
        losses = term(BATCH, s, t)
        assert set(losses) == {"ft"}
        torch.testing.assert_close(losses["ft"], 3.0 * ramp * expected)
        # the init phase: the paraphraser's reconstruction, unweighted and without ramp
        init = term.init_forward(BATCH, None, t)
        assert set(init) == {"reconstruction"}
        torch.testing.assert_close(init["reconstruction"], F.mse_loss(term.paraphraser(teacher_feat)[1], teacher_feat))
    losses["ft"].backward()
    assert all(p.grad is None for p in term.paraphraser.parameters()), "the teacher's factor carries no gradient"
    assert all(p.grad is not None for p in term.translator.parameters())


CASES = {"fsp": lambda: FSPTerm(weight=2.0), "ab": lambda: ABTerm(0.5, **TWO_STAGES, weight=0.7),
         "ft": lambda: FTTerm(0.5, 1.0, 2.0, weight=3.0)}


def all_losses(term, s, t) -> dict[str, torch.Tensor]:
    return {**term(BATCH, s, t), **{f"init_{k}": v for k, v in term.init_forward(BATCH, s, t).items()}}


@pytest.mark.parametrize("name", list(CASES))
def test_term_reads_its_features_by_name(name):
    term = CASES[name]()
    host = attach(name, term)
    plain, shuffled = outputs(host, term, seed=3), outputs(host, term, seed=3, extra=True)
    assert list(shuffled[0].features) != list(plain[0].features)
    expected, got = all_losses(term, *plain), all_losses(term, *shuffled)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip_gives_an_equal_term_with_the_same_output(name):
    term = CASES[name]()
    host = attach(name, term)
    with torch.no_grad():  # weights a fresh build would not have
        for p in term.parameters():
            p.add_(torch.randn_like(p))
    spec = term.spec()
    rebuilt = term_from_spec(spec)
    assert type(rebuilt) is type(term) and rebuilt.spec() == spec and not rebuilt.built
    other = attach(name, rebuilt)  # built from the same shapes, then given the first term's weights
    rebuilt.load_state_dict(term.state_dict())
    s, t = outputs(host, term, seed=4)
    expected, got = all_losses(term.eval(), s, t), all_losses(rebuilt.eval(), s, t)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    assert other.student_layers == host.student_layers


def test_the_host_trains_and_fixes_the_terms_parts():
    fsp = attach("fsp", FSPTerm())
    assert fsp.init_modules() == [fsp.student, fsp.terms["fsp"].connectors]
    assert fsp.frozen_after_init() == [fsp.terms["fsp"].connectors]
    ft = attach("ft", FTTerm())
    assert ft.init_modules() == [ft.terms["ft"].paraphraser], "FT's init phase does not run the student"
    assert ft.frozen_after_init() == [ft.terms["ft"].paraphraser]
    with pytest.raises(NotImplementedError, match="no term with an init phase"):
        Host().init_modules()


def test_a_host_without_an_init_phase_refuses_the_terms():
    for term in (FSPTerm(), ABTerm(), FTTerm()):
        with pytest.raises(ValueError, match=f"{type(term).__name__} trains its parts in an initialisation phase, "
                                             "which DistillationModule does not run"):
            DistillationModule(**TINY).add_term("staged", term)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="margin must be non-negative, got -1"):
        ABTerm(-1.0)
    with pytest.raises(ValueError, match="FSP relates consecutive layers, but got one pair"):
        Host().add_term("fsp", FSPTerm(["stages.1"], ["stages.1"]))


@pytest.mark.parametrize("method, parts", [(FSP, ["connectors"]), (FT, ["paraphraser", "translator"])])
def test_checkpoints_with_the_parts_on_the_method_load_into_the_term(method, parts, tmp_path):
    """Checkpoints written before the parts moved into the terms hold them as ``connectors.*``, ``paraphraser.*``."""
    torch.manual_seed(0)
    model = method(**TINY, init_epochs=1, input_shape=SHAPE)
    term_name = next(iter(model.terms))
    with torch.no_grad():
        for p in model.terms.parameters():
            p.add_(torch.randn_like(p))
    prefix = f"terms.{term_name}."
    old_state = {k.removeprefix(prefix): v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    assert {k.split(".")[0] for k in old_state} >= set(parts)
    torch.save({"state_dict": old_state, "hyper_parameters": dict(model.hparams), "init_phase_done": True,
                "pytorch-lightning_version": L.__version__}, tmp_path / "old.ckpt")
    restored = method.load_from_checkpoint(tmp_path / "old.ckpt")
    assert restored.init_phase_done
    for part in parts:
        for key, value in getattr(model, part).state_dict().items():
            assert torch.equal(getattr(restored, part).state_dict()[key], value), f"{part}.{key}"
