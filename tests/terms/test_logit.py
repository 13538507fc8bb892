"""Logit terms (KD, DKD, DIST, CTKD, NormKD, RLD, MLKD, Tf-KD's virtual teacher): alone on hand-built outputs each is
its functional loss × weight (× ramp), rebuilds from its spec, takes the host's standardization unless it sets its own,
and on per-pixel / per-token logits averages over the positions whose label is not ``ignore_index``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_trainer
from lightning_kd.losses import (dist_loss, dkd_loss, kd_loss, mlkd_loss, normkd_loss, rld_loss, standardize_logits,
                                 virtual_teacher_loss)
from lightning_kd.methods import (CTKD, DIST, MLKD, RLD, Batch, DistillationModule, ModelOutput, NormKD, TfKDSelf,
                                  TfKDVirtual)
from lightning_kd.nn import ctkd_temperature
from lightning_kd.terms import (CTKDTerm, DISTTerm, DKDTerm, KDTerm, MLKDTerm, NormKDTerm, RLDTerm, TfKDVirtualTerm,
                                term_from_spec)

TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
CTKD_START = 1 + 20 / (1 + math.exp(-1.0))  # θ = 1: T_min + (T_max − T_min) · sigmoid(1)


class Host(DistillationModule):
    """A host whose epoch the test sets."""

    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def attach(name: str, term, **kwargs):
    host = Host(**{**TINY, **kwargs})
    host.add_term(name, term)
    return host


def randn(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def logits(seed: int = 0, batch: int = 6, classes: int = 10):
    target = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 100))
    return ModelOutput(randn(batch, classes, seed=seed)), ModelOutput(randn(batch, classes, seed=seed + 1)), target


# term, its loss name, the functional loss on (student logits, teacher logits, labels)
CASES = {
    "kd": (lambda **kw: KDTerm(3.0, **kw), lambda s, t, y: kd_loss(s, t, 3.0)),
    "dkd": (lambda **kw: DKDTerm(0.5, 4.0, 2.0, **kw), lambda s, t, y: dkd_loss(s, t, y, 0.5, 4.0, 2.0)),
    "dist": (lambda **kw: DISTTerm(1.5, 0.5, 3.0, **kw), lambda s, t, y: dist_loss(s, t, 1.5, 0.5, 3.0)),
    "ctkd": (lambda **kw: CTKDTerm(**kw), lambda s, t, y: kd_loss(s, t, CTKD_START)),
    "normkd": (lambda **kw: NormKDTerm(1.5, **kw), lambda s, t, y: normkd_loss(s, t, 1.5)),
    "rld": (lambda **kw: RLDTerm(0.5, 4.0, 3.0, 2.0, **kw), lambda s, t, y: rld_loss(s, t, y, 0.5, 4.0, 3.0, 2.0)),
    "mlkd": (lambda **kw: MLKDTerm([2.0, 4.0], [4.0], **kw), lambda s, t, y: mlkd_loss(s, t, (2.0, 4.0))),
    "virtual": (lambda **kw: TfKDVirtualTerm(0.9, 5.0, **kw), lambda s, t, y: virtual_teacher_loss(s, y, 0.9, 5.0)),
}
LOSS_NAME = {"ctkd": "kd", "normkd": "kd"}


@pytest.mark.parametrize("name", list(CASES))
def test_term_is_the_functional_loss_times_weight_and_ramp(name):
    make, functional = CASES[name]
    term = make(weight=3.5, warmup_epochs=4)
    host = attach(name, term)
    student_out, teacher_out, target = logits()
    batch = Batch(torch.zeros(6, 1, 8, 8), target)
    expected = functional(student_out.logits, teacher_out.logits, target)
    assert expected > 0
    loss_name = LOSS_NAME.get(name, name)
    for epoch, ramp in ((0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)):
        host.epoch_now = epoch
        losses = term(batch, student_out, teacher_out)
        assert set(losses) == {loss_name}
        torch.testing.assert_close(losses[loss_name], 3.5 * ramp * expected)
    torch.testing.assert_close(term.losses(batch, student_out, teacher_out)[loss_name], expected)


@pytest.mark.parametrize("name", list(CASES))
def test_term_reads_logits_not_features(name):
    make, _ = CASES[name]
    term = make()
    host = attach(name, term)
    assert (term.student_layers, term.teacher_layers) == ([], [])
    student_out, teacher_out, target = logits(2)
    batch = Batch(torch.zeros(6, 1, 8, 8), target)
    extra = {"b": randn(6, 4, seed=5), "a": randn(6, 3, 2, 2, seed=6)}
    plain = term(batch, student_out, teacher_out)
    crowded = term(batch, ModelOutput(student_out.logits, extra), ModelOutput(teacher_out.logits, dict(extra)))
    for key, value in plain.items():
        torch.testing.assert_close(crowded[key], value)


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip_gives_an_equal_term(name):
    make, _ = CASES[name]
    term = make(weight=0.7, warmup_epochs=2, standardize=True)
    spec = term.spec()
    rebuilt = term_from_spec(spec)
    assert type(rebuilt) is type(term) and rebuilt.spec() == spec
    if name == "ctkd":
        with torch.no_grad():
            term.temperature.fill_(-0.4)
        rebuilt.load_state_dict(term.state_dict())
    student_out, teacher_out, target = logits(3)
    batch = Batch(torch.zeros(6, 1, 8, 8), target)
    hosts = attach(name, term), attach(name, rebuilt)  # noqa: F841  (a term holds its host weakly)
    expected = term(batch, student_out, teacher_out)
    for key, value in rebuilt(batch, student_out, teacher_out).items():
        torch.testing.assert_close(value, expected[key])


def test_kd_term_is_kd_loss_times_weight_and_by_hand():
    # one sample at T = 1: teacher (1/6, 1/6, 4/6), student uniform: KL = ln(2) / 3
    term = KDTerm(1.0, weight=0.9)
    host = attach("kd", term)
    batch = Batch(torch.zeros(1, 1, 8, 8), torch.tensor([0]))
    teacher = ModelOutput(torch.tensor([[0.0, 0.0, math.log(4.0)]]))
    loss = term(batch, ModelOutput(torch.zeros(1, 3)), teacher)["kd"]
    assert loss.item() == pytest.approx(0.9 * math.log(2.0) / 3, rel=1e-6)
    student_out, teacher_out, target = logits(4)
    torch.testing.assert_close(term(Batch(torch.zeros(6), target), student_out, teacher_out)["kd"],
                               0.9 * kd_loss(student_out.logits, teacher_out.logits, 1.0))


def test_dkd_term_is_dkd_loss_times_weight_and_ramps_over_epochs_counted_from_one():
    term = DKDTerm(warmup_epochs=20, weight=2.0)
    host = attach("dkd", term)
    student_out, teacher_out, target = logits(5)
    batch = Batch(torch.zeros(6), target)
    full = dkd_loss(student_out.logits, teacher_out.logits, target, 1.0, 8.0, 4.0)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (18, 19 / 20), (19, 1.0), (50, 1.0)):
        host.epoch_now = epoch
        torch.testing.assert_close(term(batch, student_out, teacher_out)["dkd"], 2.0 * ramp * full)
    # by hand: student uniform, teacher (1/6, 2/6, 3/6), label 0, T = 1, α = β = 1:
    # TCKD = 1/6 ln(1/2) + 5/6 ln(5/4); NCKD = 2/5 ln(4/5) + 3/5 ln(6/5)
    term = DKDTerm(1.0, 1.0, 1.0)
    host = attach("dkd", term)
    loss = term(Batch(torch.zeros(1), torch.tensor([0])), ModelOutput(torch.zeros(1, 3)),
                ModelOutput(torch.log(torch.tensor([[1.0, 2.0, 3.0]]))))["dkd"]
    by_hand = (math.log(0.5) / 6 + 5 / 6 * math.log(1.25) + 0.4 * math.log(0.8) + 0.6 * math.log(1.2))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("make,functional", [(lambda **kw: KDTerm(2.0, **kw), lambda s, t, y: kd_loss(s, t, 2.0)),
                                             (lambda **kw: DKDTerm(**kw), lambda s, t, y: dkd_loss(s, t, y))])
def test_standardize_is_the_hosts_unless_the_term_sets_its_own(make, functional):
    student_out, teacher_out, target = logits(6)
    batch = Batch(torch.zeros(6), target)
    s, t = student_out.logits, teacher_out.logits
    standardized = functional(standardize_logits(s), standardize_logits(t), target)
    plain = functional(s, t, target)
    assert not torch.allclose(standardized, plain)
    for host_standardize, term_standardize, expected in ((True, None, standardized), (False, None, plain),
                                                         (True, False, plain), (False, True, standardized)):
        term = make(standardize=term_standardize)
        host = attach("term", term, standardize=host_standardize)
        assert term.standardize is (expected is standardized)
        loss, = term(batch, student_out, teacher_out).values()
        torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------ pixels and tokens
def naive_token_kd(student, teacher, target, temperature, ignore_index=-100):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) of every token whose label is not ``ignore_index``, averaged, in float64
    loops."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            if int(target[b, i]) == ignore_index:
                continue
            s = [float(v) / temperature for v in student[b, i]]
            t = [float(v) / temperature for v in teacher[b, i]]
            log_zs = math.log(sum(math.exp(v) for v in s))
            log_zt = math.log(sum(math.exp(v) for v in t))
            total += temperature**2 * sum(math.exp(tv - log_zt) * ((tv - log_zt) - (sv - log_zs))
                                          for sv, tv in zip(s, t))
            count += 1
    return total / count


def test_kd_term_on_tokens_averages_over_the_tokens_that_are_not_ignored():
    generator = torch.Generator().manual_seed(7)
    student, teacher = randn(3, 5, 11, seed=8), randn(3, 5, 11, seed=9)
    target = torch.randint(0, 11, (3, 5), generator=generator)
    target[0, 1] = target[1, 4] = target[2, 0] = target[2, 3] = -100
    term = KDTerm(2.0, weight=0.5)
    host = attach("kd", term)
    loss = term(Batch(torch.zeros(3, 5), target), ModelOutput(student), ModelOutput(teacher))["kd"]
    assert loss.item() == pytest.approx(0.5 * naive_token_kd(student, teacher, target, 2.0), rel=1e-5)
    everything = term(Batch(torch.zeros(3, 5), target.clamp(min=0)), ModelOutput(student), ModelOutput(teacher))["kd"]
    assert everything.item() == pytest.approx(0.5 * naive_token_kd(student, teacher, target.clamp(min=0), 2.0),
                                              rel=1e-5)
    assert not math.isclose(loss.item(), everything.item(), rel_tol=1e-3)


def test_kd_term_on_tokens_by_hand_and_with_its_own_ignore_index():
    # token 0: teacher (1/6, 1/6, 4/6), student uniform, T = 1: KL = ln(2) / 3; token 1 is ignored
    student = torch.zeros(1, 2, 3)
    teacher = torch.tensor([[[0.0, 0.0, math.log(4.0)], [5.0, -3.0, 1.0]]])
    term = KDTerm(1.0, ignore_index=255)
    host = attach("kd", term)
    loss = term(Batch(torch.zeros(1, 2), torch.tensor([[2, 255]])), ModelOutput(student), ModelOutput(teacher))["kd"]
    assert loss.item() == pytest.approx(math.log(2.0) / 3, rel=1e-6)


def valid_rows(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (N, C) matrix of the kept positions of (B, C, H, W) logits."""
    return logits.permute(0, 2, 3, 1)[keep]


DENSE = ["kd", "dkd", "dist", "ctkd", "normkd", "rld", "virtual"]


@pytest.mark.parametrize("name", DENSE)
def test_term_on_pixels_is_the_term_on_the_matrix_of_the_valid_pixels(name):
    make, _ = CASES[name]
    term = make(weight=1.5, ignore_index=255)
    host = attach(name, term)
    student, teacher = randn(2, 10, 3, 4, seed=10), randn(2, 10, 3, 4, seed=11)
    target = torch.randint(0, 10, (2, 3, 4), generator=torch.Generator().manual_seed(12))
    target[0, 0, :3] = 255
    target[1, 2, 1] = 255
    batch = Batch(torch.zeros(2, 1, 3, 4), target)
    batch.mask = torch.ones(2, 3, 4, dtype=torch.bool)
    batch.mask[1, 0] = False
    keep = (target != 255) & batch.mask
    dense, = term(batch, ModelOutput(student), ModelOutput(teacher)).values()
    rows = Batch(torch.zeros(int(keep.sum())), target[keep])
    flat, = term(rows, ModelOutput(valid_rows(student, keep)), ModelOutput(valid_rows(teacher, keep))).values()
    torch.testing.assert_close(dense, flat)
    without_mask = Batch(batch.input, target)
    unmasked, = term(without_mask, ModelOutput(student), ModelOutput(teacher)).values()
    assert not torch.allclose(unmasked, dense)


def test_mlkd_term_refuses_pixels_with_a_clear_error():
    term = MLKDTerm()
    host = attach("mlkd", term)
    with pytest.raises(ValueError, match=r"takes \(B, C\) logits only"):
        term(Batch(torch.zeros(2), torch.zeros(2, 3, 3, dtype=torch.long)), ModelOutput(randn(2, 10, 3, 3, seed=0)),
             ModelOutput(randn(2, 10, 3, 3, seed=1)))


# ----------------------------------------------------------------------------------------------- teacher
def test_only_the_virtual_teacher_term_works_without_a_teacher():
    teacherless = TfKDVirtual(student="cnn_tiny", num_classes=10, in_chans=1)
    assert teacherless.teacher is None and not TfKDVirtualTerm.requires_teacher
    student_out, _, target = logits(12)
    loss = teacherless.distillation_losses(Batch(torch.zeros(6), target), student_out, None)["virtual"]
    torch.testing.assert_close(loss, 1.0 * virtual_teacher_loss(student_out.logits, target, 0.99, 20.0))
    with pytest.raises(ValueError, match="KDTerm distils from a teacher, but TfKDVirtual has none: pass teacher="):
        teacherless.add_term("kd", KDTerm())


# ------------------------------------------------------------------------------------------------ CTKD
def test_ctkd_term_holds_the_learnt_temperature_and_logs_only_with_a_trainer():
    model = CTKD(**TINY)
    term = model.terms["ctkd"]
    assert model.temperature is term.temperature and isinstance(term.temperature, torch.nn.Parameter)
    assert "terms.ctkd.temperature" in model.state_dict() and "temperature" not in model.state_dict()
    assert any(p is term.temperature for p in model.trainable_parameters())
    student_out, teacher_out, target = logits(13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "self.log() without a trainer" warning
        loss = term(Batch(torch.zeros(6), target), student_out, teacher_out)["kd"]
    torch.testing.assert_close(loss, 0.9 * kd_loss(student_out.logits, teacher_out.logits, CTKD_START))
    # the curriculum: epoch 0 is epoch 1 of lambda_epochs=2, λ = 1/2, so θ's gradient is −1/2 of the true one
    term2 = CTKDTerm(lambda_epochs=2)
    host = attach("ctkd", term2)
    term2(Batch(torch.zeros(6), target), student_out, teacher_out)["kd"].backward()
    theta = torch.tensor(1.0, requires_grad=True)
    kd_loss(student_out.logits, teacher_out.logits, ctkd_temperature(theta, -1.0)).backward()  # λ = −1: true grad
    assert term2.temperature.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-5)


def test_ctkd_term_checks_its_range():
    with pytest.raises(ValueError, match="max_temperature=1.0 must exceed min_temperature=2.0"):
        CTKDTerm(min_temperature=2.0, max_temperature=1.0)


# ------------------------------------------------------------------------------------------------ MLKD
def test_mlkd_strong_view_cross_entropy_takes_the_hosts_ce_weight():
    term = MLKDTerm([2.0, 4.0], [4.0], weight=2.0)
    host = attach("mlkd", term, ce_weight=0.3)
    student_out, teacher_out, target = logits(14)
    s_strong, t_strong = randn(6, 10, seed=15), randn(6, 10, seed=16)
    host.forward_teacher = lambda batch: ModelOutput(t_strong)
    host.forward_student = lambda batch: ModelOutput(s_strong)
    batch = Batch(torch.zeros(6, 1, 8, 8), target, None, {"strong": torch.zeros(6, 1, 8, 8)})
    losses = term(batch, student_out, teacher_out)
    s, t = student_out.logits, teacher_out.logits
    torch.testing.assert_close(losses["mlkd"], 2.0 * mlkd_loss(s, t, (2.0, 4.0)))
    torch.testing.assert_close(losses["mlkd_strong"], 2.0 * (kd_loss(s, t, 2.0) + kd_loss(s_strong, t_strong, 4.0)))
    torch.testing.assert_close(losses["ce_strong"], 0.3 * F.cross_entropy(s_strong, target))


def test_mlkd_term_checks_its_strong_temperatures_before_building_models():
    with pytest.raises(ValueError, match=r"strong_temperatures \[7.0\] are not among temperatures"):
        MLKDTerm([2.0, 3.0], [7.0])


# --------------------------------------------------------------------------------------------- methods
def test_methods_are_their_terms_with_the_papers_defaults():
    init_args = MLKD(**TINY).terms["mlkd"].spec()["init_args"]
    assert {key: init_args[key] for key in ("temperatures", "strong_temperatures", "weight")} == {
        "temperatures": [2.0, 3.0, 4.0, 5.0, 6.0], "strong_temperatures": [3.0, 4.0, 5.0], "weight": 0.9}
    assert RLD(**TINY).terms["rld"].warmup_epochs == 20
    self_kd = TfKDSelf(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1)
    assert self_kd.terms["kd"].weight == pytest.approx(0.95 * 50 / 10) == self_kd.kd_weight
    virtual = TfKDVirtual(student="cnn_tiny", num_classes=10, in_chans=1)
    assert virtual.terms["virtual"].weight == pytest.approx(0.1 * 100 / 10)
    assert (DIST(**TINY).terms["dist"].beta, NormKD(**TINY).terms["normkd"].temperature_scale) == (2.0, 2.0)


@pytest.mark.parametrize("method", [DIST, CTKD, NormKD, RLD, MLKD, TfKDSelf, TfKDVirtual])
def test_every_converted_method_trains_with_mixing(method, digits):
    torch.manual_seed(0)
    model = method(student="cnn_tiny", teacher="cnn_small" if method is not TfKDSelf else "cnn_tiny", num_classes=10,
                   in_chans=1, mix="cutmix")
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, digits)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
