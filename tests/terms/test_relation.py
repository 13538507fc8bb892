"""Relation terms (SP, PKT, RKD, CC): alone on hand-built outputs each is its functional loss × weight (× ramp),
reads its features by name, rebuilds from its spec, and picks the paper's default layers on a host."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.losses import cc_loss, pkt_loss, rkd_loss, sp_loss
from lightning_kd.methods import CC, PKT, RKD, SP, Batch, DistillationModule, ModelOutput
from lightning_kd.terms import CCTerm, PKTTerm, RKDTerm, SPTerm, term_from_spec

TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)


class Host(DistillationModule):
    """A host whose epoch the test sets."""

    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def attach(name: str, term):
    host = Host(**TINY)
    host.add_term(name, term)
    return host


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outputs(term, student_shape, teacher_shape, batch_size: int = 5):
    """Student and teacher outputs holding a random feature under each of the term's layer names."""
    student = {name: randn(batch_size, *student_shape, seed=i) for i, name in enumerate(term.student_layers)}
    teacher = {name: randn(batch_size, *teacher_shape, seed=10 + i) for i, name in enumerate(term.teacher_layers)}
    return (ModelOutput(randn(batch_size, 10, seed=20), student), ModelOutput(randn(batch_size, 10, seed=21), teacher))


def shuffled(out: ModelOutput) -> ModelOutput:
    """The same features in reverse order, with extra entries before and after them."""
    first, last = randn(5, 3, seed=30), randn(5, 7, 2, 2, seed=31)
    return ModelOutput(out.logits, {"extra.first": first, **dict(reversed(out.features.items())), "extra.last": last})


BATCH = Batch(torch.zeros(5, 1, 8, 8), torch.arange(5))

# term, its loss name, the functional loss on (student feature, teacher feature), feature shapes without the batch
CASES = {
    "sp": (lambda **kw: SPTerm("stages.1", "stages.1", **kw), lambda s, t: sp_loss(s, t), (16, 4, 4), (32, 4, 4)),
    "pkt": (lambda **kw: PKTTerm(**kw), lambda s, t: pkt_loss(s, t), (16,), (32,)),
    "rkd": (lambda **kw: RKDTerm(10.0, 30.0, **kw), lambda s, t: rkd_loss(s, t, 10.0, 30.0), (16,), (32,)),
    "cc": (lambda **kw: CCTerm(0.7, 3, **kw), lambda s, t: cc_loss(s, t, 0.7, 3), (16,), (32,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_term_is_the_functional_loss_times_weight_and_ramp(name):
    make, functional, student_shape, teacher_shape = CASES[name]
    term = make(weight=3.5, warmup_epochs=4)
    host = attach(name, term)
    student_out, teacher_out = outputs(term, student_shape, teacher_shape)
    s, = student_out.features.values()
    t, = teacher_out.features.values()
    expected = functional(s, t)
    assert expected > 0
    for epoch, ramp in ((0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)):
        host.epoch_now = epoch
        losses = term(BATCH, student_out, teacher_out)
        assert set(losses) == {name}
        torch.testing.assert_close(losses[name], 3.5 * ramp * expected)
    torch.testing.assert_close(term.losses(BATCH, student_out, teacher_out)[name], expected)


@pytest.mark.parametrize("name", list(CASES))
def test_term_reads_its_features_by_name(name):
    make, _, student_shape, teacher_shape = CASES[name]
    term = make(weight=2.0)
    attach(name, term)
    student_out, teacher_out = outputs(term, student_shape, teacher_shape)
    plain = term(BATCH, student_out, teacher_out)[name]
    torch.testing.assert_close(term(BATCH, shuffled(student_out), shuffled(teacher_out))[name], plain)


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip(name):
    make, _, student_shape, teacher_shape = CASES[name]
    term = make(weight=2.0, warmup_epochs=3)
    spec = term.spec()
    clone = term_from_spec(spec)
    assert type(clone) is type(term) and clone.spec() == spec
    assert spec["init_args"]["weight"] == 2.0 and spec["init_args"]["warmup_epochs"] == 3
    hosts = attach(name, term), attach(name, clone)  # noqa: F841  (terms hold their hosts weakly)
    assert (clone.student_layers, clone.teacher_layers) == (term.student_layers, term.teacher_layers)
    student_out, teacher_out = outputs(term, student_shape, teacher_shape)
    torch.testing.assert_close(clone(BATCH, student_out, teacher_out), term(BATCH, student_out, teacher_out))


def test_default_layers_and_method_arguments_reach_the_terms():
    sp, pkt = SP(**TINY).terms["sp"], PKT(**TINY).terms["pkt"]
    assert (sp.student_layers, sp.teacher_layers) == (["stages.1"], ["stages.1"]), "the last stage before pooling"
    assert (pkt.student_layers, pkt.teacher_layers) == (["pool"], ["pool"]), "the pooled embedding"
    rkd = RKD(**TINY, distance_weight=3.0, angle_weight=4.0, rkd_weight=0.5).terms["rkd"]
    assert (rkd.distance_weight, rkd.angle_weight, rkd.weight) == (3.0, 4.0, 0.5)
    cc = CC(**TINY, gamma=0.2, p_order=3, cc_weight=7.0, student_layer="stages.1", teacher_layer="stages.0").terms["cc"]
    assert (cc.gamma, cc.p_order, cc.weight) == (0.2, 3, 7.0)
    assert (cc.student_layers, cc.teacher_layers) == (["stages.1"], ["stages.0"])


def test_a_wrong_layer_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the teacher \(SimpleCNN\) has no module 'stages\.9'"):
        attach("sp", SPTerm(teacher_layer="stages.9"))
