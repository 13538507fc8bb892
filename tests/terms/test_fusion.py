"""Fusion terms (OFD, ReviewKD): alone on hand-built outputs each is its functional loss × weight (× ramp), reads its
features by name, rebuilds from its spec (the same output once its state is loaded), OFD's margins come from the
host teacher's BatchNorms, and a ReviewKD checkpoint written before the terms existed still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.features import paired_stages
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin_from_bn
from lightning_kd.methods import Batch, DistillationModule, ModelOutput, ReviewKD
from lightning_kd.methods.ofd import paired_stages as reexported_paired_stages
from lightning_kd.models import create_model
from lightning_kd.terms import OFDTerm, ReviewKDTerm, term_from_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
#: feature shapes of cnn_tiny (student) and cnn_small (teacher) on 1×8×8 inputs, without the batch dimension
PRE_0, PRE_1 = "stages.0.0.2:input", "stages.1.1.2:input"  # the inputs of each stage's ReLU
STUDENT_SHAPES = {PRE_0: (8, 8, 8), PRE_1: (16, 4, 4), "stages.1": (16, 4, 4), "pool": (16,)}
TEACHER_SHAPES = {PRE_0: (16, 8, 8), PRE_1: (32, 4, 4), "pool": (32,)}
BATCH = Batch(torch.zeros(4, 1, 8, 8), torch.arange(4))


class Host(DistillationModule):
    """A host whose epoch the test sets."""

    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def randomize_batchnorms(model: nn.Module, seed: int) -> None:
    """Trained-looking BatchNorm affine parameters (γ of both signs, β around 0), so that margins differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.5)


def attach(name: str, term, seed: int = 0) -> Host:
    torch.manual_seed(seed)
    teacher = create_model("cnn_small", num_classes=10, in_chans=1)
    randomize_batchnorms(teacher, seed)
    host = Host(**{**TINY, "teacher": teacher})
    host.add_term(name, term)
    return host


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outputs(term, batch_size: int = 4) -> tuple[ModelOutput, ModelOutput]:
    """Student and teacher outputs holding a random feature of the right shape under each of the term's layers."""
    student = {name: randn(batch_size, *STUDENT_SHAPES[name], seed=i) for i, name in enumerate(term.student_layers)}
    teacher = {name: randn(batch_size, *TEACHER_SHAPES[name], seed=10 + i)
               for i, name in enumerate(term.teacher_layers)}
    return ModelOutput(randn(batch_size, 10, seed=20), student), ModelOutput(randn(batch_size, 10, seed=21), teacher)


def shuffled(out: ModelOutput) -> ModelOutput:
    """The same features in reverse order, with extra entries before and after them."""
    first, last = randn(4, 3, seed=30), randn(4, 7, 2, 2, seed=31)
    return ModelOutput(out.logits, {"extra.first": first, **dict(reversed(out.features.items())), "extra.last": last})


def ofd_expected(term, s, t):
    margins = term.margins
    return {"ofd": ofd_loss(term.connectors[0](s[0]), t[0], margins[0]) / 2
            + ofd_loss(term.connectors[1](s[1]), t[1], margins[1])}


def ofd_pooled_expected(term, s, t):
    return {"ofd": ofd_loss(term.connectors[0](s[0]), F.adaptive_avg_pool2d(t[0], (4, 4)), term.margins[0])}


def reviewkd_expected(term, s, t):
    fused = term.fusion(s)
    return {"reviewkd": hcl_loss(fused[0], t[0]) + hcl_loss(fused[1], t[1][:, :, None, None])}


CASES = {
    "ofd": (lambda **kw: OFDTerm([PRE_0, PRE_1], [PRE_0, PRE_1], **kw), ofd_expected),
    "ofd_pooled": (lambda **kw: OFDTerm([PRE_1], [PRE_0], **kw), ofd_pooled_expected),
    "reviewkd": (lambda **kw: ReviewKDTerm(8, **kw), reviewkd_expected),
}


@pytest.mark.parametrize("name", list(CASES))
def test_term_is_the_functional_loss_times_weight_and_ramp(name):
    make, expected_losses = CASES[name]
    term = make(weight=0.5, warmup_epochs=20)
    host = attach(name, term)
    student_out, teacher_out = outputs(term)
    s, t = list(student_out.features.values()), list(teacher_out.features.values())
    expected = expected_losses(term, s, t)
    assert all(value > 0 for value in expected.values())
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        host.epoch_now = epoch
        losses = term(BATCH, student_out, teacher_out)
        assert set(losses) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(losses[key], 0.5 * ramp * value, msg=key)


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
    hosts = attach(name, term, seed=0), attach(name, clone, seed=1)  # noqa: F841  (another teacher's BatchNorms)
    assert (clone.student_layers, clone.teacher_layers) == (term.student_layers, term.teacher_layers)
    student_out, teacher_out = outputs(term)
    before = clone(BATCH, student_out, teacher_out)
    assert any(not torch.allclose(before[k], v) for k, v in term(BATCH, student_out, teacher_out).items())
    clone.load_state_dict(term.state_dict())
    torch.testing.assert_close(clone(BATCH, student_out, teacher_out), term(BATCH, student_out, teacher_out))


def test_ofd_margins_are_buffers_from_the_teacher_batchnorms_before_the_relus():
    term = OFDTerm([PRE_0, PRE_1], [PRE_0, PRE_1])
    host = attach("ofd", term, seed=3)
    assert term.teacher_bns == ["stages.0.0.1", "stages.1.1.1"]
    assert {key for key in term.state_dict() if key.startswith("margin")} == {"margin_0", "margin_1"}
    for margin, bn in zip(term.margins, term.teacher_bns):
        assert torch.equal(margin, ofd_margin_from_bn(host.teacher.get_submodule(bn))) and margin.std() > 0
    assert [(c.conv.in_channels, c.conv.out_channels) for c in term.connectors] == [(8, 16), (16, 32)]


def test_reviewkd_default_layers_and_errors():
    term = ReviewKDTerm()
    host = attach("reviewkd", term)  # noqa: F841
    assert (term.student_layers, term.teacher_layers) == (["stages.1", "pool"], [PRE_1, "pool"])
    with pytest.raises(ValueError, match="ReviewKD pairs student and teacher layers in order: pass both"):
        ReviewKDTerm(student_layers=["stages.1", "pool"])
    with pytest.raises(ValueError, match="ReviewKD pairs student and teacher layers in order.*1 student.*2 teacher"):
        attach("reviewkd", ReviewKDTerm(student_layers=["pool"], teacher_layers=[PRE_1, "pool"]))
    with pytest.raises(ValueError, match="teacher_bns must name BatchNorm modules.*'stages.1.1.0' .* Conv2d"):
        attach("ofd", OFDTerm(teacher_bns=["stages.1.1.0"]))


def test_paired_stages_lives_in_features_and_is_still_importable_from_ofd():
    assert reexported_paired_stages is paired_stages
    assert paired_stages(None, None, ["a", "b", "c"], ["x", "y"], "M") == (["b", "c"], ["x", "y"])


def test_reviewkd_checkpoint_written_before_terms_loads_strictly(monkeypatch):
    monkeypatch.chdir(ROOT)  # the checkpoint names its teacher weights relative to the repository root
    path = "tests/methods/legacy/ReviewKD.ckpt"
    stored = torch.load(path, weights_only=True)["state_dict"]
    old = {key[len("fusion."):]: value for key, value in stored.items() if key.startswith("fusion.")}
    assert old, "the legacy checkpoint holds the fusion modules at the top level"
    model = ReviewKD.load_from_checkpoint(path, strict=True)
    loaded = model.fusion.state_dict()
    assert loaded.keys() == old.keys()
    for key, value in old.items():
        assert torch.equal(loaded[key], value), key
    assert all(f"terms.reviewkd.fusion.{key}" in model.state_dict() for key in old)
    assert (model.terms["reviewkd"].warmup_epochs, model.terms["reviewkd"].max_mid_channels) == (20, 8)
