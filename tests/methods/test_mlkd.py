"""Tests of lightning_kd.methods.mlkd (MLKD), its single-view and two-view (weak and strong augmentation) losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_trainer, strong_data
from helpers import logits_pair, method_losses
from lightning_kd.losses.logit_refined import mlkd_loss
from lightning_kd.methods.base import Batch, ModelOutput
from lightning_kd.methods.mlkd import MLKD


def naive_official(s_w, t_w, s_s, t_s, y, ce_weight=0.1, kd_weight=0.9):
    """``KD_ours.forward_train`` of the official code written out, float64: the total loss, CE on both views."""

    def probs(z, temperature):
        return torch.softmax(z / temperature, dim=1)

    def kl(s, t, temperature):  # sum over classes, mean over samples, times T^2
        p_s, p_t = probs(s, temperature), probs(t, temperature)
        rows = [sum(p_t[n, c] * (p_t[n, c].log() - p_s[n, c].log()) for c in range(s.shape[1]))
                for n in range(s.shape[0])]
        return sum(rows) / len(rows) * temperature**2

    def class_corr(s, t, temperature):
        p_s, p_t = probs(s, temperature), probs(t, temperature)
        return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / s.shape[1]

    def batch_corr(s, t, temperature):
        p_s, p_t = probs(s, temperature), probs(t, temperature)
        return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / s.shape[0]

    teacher = torch.softmax(t_w, dim=1)
    confidence = teacher.max(dim=1).values
    mask = (confidence <= np.percentile(confidence.numpy(), 50)).double()
    class_confidence = teacher.sum(dim=0)
    class_mask = (class_confidence <= np.percentile(class_confidence.numpy(), 50)).double()
    ce = ce_weight * (F.cross_entropy(s_w, y) + F.cross_entropy(s_s, y))
    kd_weak = sum(kd_weight * (kl(s_w, t_w, T) * mask).mean() for T in (4.0, 3.0, 5.0, 2.0, 6.0))
    kd_strong = kd_weight * (kl(s_s, t_s, 4.0) + kl(s_s, t_s, 3.0) + kl(s_s, t_s, 5.0) + kl(s_w, t_w, 2.0)
                             + kl(s_w, t_w, 6.0))
    cc_weak = sum(kd_weight * (class_corr(s_w, t_w, T) * class_mask).mean() for T in (4.0, 3.0, 5.0, 2.0, 6.0))
    bc_weak = sum(kd_weight * (batch_corr(s_w, t_w, T) * mask).mean() for T in (4.0, 3.0, 5.0, 2.0, 6.0))
    return ce + kd_weak + kd_strong + cc_weak + bc_weak


def four_logits(seed=0, batch=6, classes=10):
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    return (*logits, torch.randint(0, classes, (batch,), generator=generator))


def two_view_losses(model, s_w, t_w, s_s, t_s, target, calls=None):
    """The method's losses (the base's weak-view CE included) on given logits: the strong view's forwards return
    ``s_s`` and ``t_s``."""
    strong, index = torch.zeros(len(target), 1, 8, 8), torch.arange(len(target))

    def forward(logits, role):
        def run(batch):
            assert batch.input is strong and batch.target is target and batch.index is index
            if calls is not None:
                calls.append(role)
            return ModelOutput(logits)
        return run

    model.forward_teacher, model.forward_student = forward(t_s, "teacher"), forward(s_s, "student")
    batch = Batch(torch.zeros(len(target), 1, 8, 8), target, index, {"strong": strong})
    losses = model.distillation_losses(batch, ModelOutput(s_w), ModelOutput(t_w))
    return {"ce": model.hparams.ce_weight * F.cross_entropy(s_w, target), **losses}


def mlp_mlkd(**kwargs) -> MLKD:
    return MLKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1, **kwargs)


def test_mlkd_defaults_are_the_official_cifar_setting_and_loss_is_mlkd_loss():
    model = MLKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (tuple(hp.temperatures), hp.kd_weight, hp.ce_weight) == ((2.0, 3.0, 4.0, 5.0, 6.0), 0.9, 0.1)
    student, teacher, target = logits_pair()
    expected = 0.9 * mlkd_loss(student, teacher, (2.0, 3.0, 4.0, 5.0, 6.0))
    assert torch.allclose(method_losses(model, student, teacher, target)["mlkd"], expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_view_loss_matches_the_official_formula(seed):
    s_w, t_w, s_s, t_s, target = four_logits(seed)
    calls = []
    losses = two_view_losses(mlp_mlkd(), s_w.float(), t_w.float(), s_s.float(), t_s.float(), target, calls)
    assert set(losses) == {"ce", "mlkd", "mlkd_strong", "ce_strong"}
    assert calls == ["teacher", "student"]
    total = torch.stack(list(losses.values())).sum()
    torch.testing.assert_close(total.double(), naive_official(s_w, t_w, s_s, t_s, target), rtol=1e-5, atol=1e-6)


def test_two_view_terms_by_name_and_gradient():
    s_w, t_w, s_s, t_s, target = four_logits(3)
    s_s32 = s_s.float().requires_grad_(True)
    losses = two_view_losses(mlp_mlkd(), s_w.float(), t_w.float(), s_s32, t_s.float(), target)
    torch.testing.assert_close(losses["ce_strong"].double(), 0.1 * F.cross_entropy(s_s, target), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["mlkd"], 0.9 * mlkd_loss(s_w.float(), t_w.float()))
    # only the strong-view terms reach the strong student logits: CE and KD at T = 3, 4, 5
    (grad,) = torch.autograd.grad(losses["mlkd_strong"] + losses["ce_strong"], s_s32)
    s_s64 = s_s.clone().requires_grad_(True)
    reference = 0.1 * F.cross_entropy(s_s64, target) + 0.9 * sum(
        T**2 * F.kl_div(F.log_softmax(s_s64 / T, 1), F.softmax(t_s / T, 1), reduction="batchmean") for T in (3, 4, 5))
    (expected,) = torch.autograd.grad(reference, s_s64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_strong_instance_term_by_hand():
    # 2 samples x 2 classes at T = 1: teacher (1/4, 3/4) and (1/2, 1/2), student uniform:
    # KL = (1/4 ln(1/2) + 3/4 ln(3/2)) for the first sample, 0 for the second; batch mean, no mask
    student, teacher = torch.zeros(2, 2), torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    model = MLKD(student="mlp", teacher="mlp", num_classes=2, in_chans=1, temperatures=(1.0,),
                 strong_temperatures=(1.0,), kd_weight=1.0)
    losses = two_view_losses(model, torch.zeros(2, 2), torch.zeros(2, 2), student, teacher, torch.tensor([0, 1]))
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert losses["mlkd_strong"].item() == pytest.approx(expected, abs=1e-6)
    assert losses["mlkd"].item() == pytest.approx(0.0, abs=1e-7)


def test_strong_temperatures_choose_the_view_of_each_instance_term():
    s_w, t_w, s_s, t_s, target = (x.float() if x.is_floating_point() else x for x in four_logits(4))
    everything = two_view_losses(mlp_mlkd(strong_temperatures=(2.0, 3.0, 4.0, 5.0, 6.0)), s_w, t_w, s_s, t_s, target)
    expected = 0.9 * sum(F.kl_div(F.log_softmax(s_s / T, 1), F.softmax(t_s / T, 1), reduction="batchmean") * T**2
                         for T in (2, 3, 4, 5, 6))
    torch.testing.assert_close(everything["mlkd_strong"], expected)
    with pytest.raises(ValueError, match="strong_temperatures"):
        mlp_mlkd(strong_temperatures=(7.0,))


def test_without_a_strong_view_the_loss_is_the_single_view_one():
    model = mlp_mlkd()
    model.forward_teacher = model.forward_student = lambda batch: pytest.fail("no extra forward without a view")
    s_w, t_w, _, _, target = (x.float() if x.is_floating_point() else x for x in four_logits(5))
    losses = model.distillation_losses(Batch(torch.zeros(6, 1, 8, 8), target), ModelOutput(s_w), ModelOutput(t_w))
    assert set(losses) == {"mlkd"}
    torch.testing.assert_close(losses["mlkd"], 0.9 * mlkd_loss(s_w, t_w))


def test_strong_view_refuses_mixing_and_replayed_teacher_outputs():
    model = mlp_mlkd()
    model.replay_teacher = lambda batch: torch.zeros(len(batch.target), 10)
    s_w, t_w, s_s, t_s, target = (x.float() if x.is_floating_point() else x for x in four_logits(6))
    with pytest.raises(ValueError, match="mix=None and drop the teacher-output cache"):
        two_view_losses(model, s_w, t_w, s_s, t_s, target)


def test_mlkd_trains_on_both_views_with_the_frozen_teacher(monkeypatch):
    torch.manual_seed(0)
    model = MLKD(student="resnet8", teacher="resnet8", num_classes=10)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    teacher_inputs = []
    forward_teacher = MLKD.forward_teacher

    def spy(self, batch):
        if self.training:
            teacher_inputs.append(batch.input)
        return forward_teacher(self, batch)

    monkeypatch.setattr(MLKD, "forward_teacher", spy)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, strong_data())
    logged = trainer.callback_metrics
    names = ("ce", "mlkd", "mlkd_strong", "ce_strong")
    assert {k for k in logged if k.startswith("train/loss_")} == {f"train/loss_{n}" for n in names}
    assert all(torch.isfinite(logged[f"train/loss_{n}"]) and logged[f"train/loss_{n}"] > 0 for n in names)
    torch.testing.assert_close(logged["train/loss"], sum(logged[f"train/loss_{n}"] for n in names))
    # two teacher forwards (weak, strong) per training step
    assert len(teacher_inputs) == 4 and not torch.equal(teacher_inputs[0], teacher_inputs[1])
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in student_before.items())
