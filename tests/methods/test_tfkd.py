"""Tests of lightning_kd.methods.tfkd (Tf-KD: self-teacher and virtual teacher)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_trainer
from helpers import logits_pair, method_losses
from lightning_kd.losses import kd_loss
from lightning_kd.losses.logit_refined import virtual_teacher_loss, virtual_teacher_probs
from lightning_kd.methods.mlkd import MLKD
from lightning_kd.methods.rld import RLD
from lightning_kd.methods.tfkd import TfKDSelf, TfKDVirtual


def test_tfkd_self_is_kd_with_the_official_weights_and_reduction():
    model = TfKDSelf(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.temperature, hp.multiplier) == (0.95, 6.0, 50.0)
    assert hp.ce_weight == pytest.approx(0.05)
    student, teacher, target = logits_pair()
    # official: alpha * multiplier * T^2 * nn.KLDivLoss() of torch 1.2, the mean over the B * C entries
    entries = torch.nn.functional.kl_div(torch.log_softmax(student / 6, 1), torch.softmax(teacher / 6, 1),
                                         reduction="sum") / student.numel()
    official = 0.95 * 50.0 * 36 * entries
    loss = method_losses(model, student, teacher, target)["kd"]
    assert torch.allclose(loss, official, rtol=1e-5)
    assert torch.allclose(loss, 0.95 * 50.0 / 10 * kd_loss(student, teacher, 6.0))


def test_tfkd_cross_entropy_weight_follows_alpha_unless_given():
    assert TfKDSelf(student="mlp", teacher="mlp", num_classes=10, in_chans=1, alpha=0.9).hparams.ce_weight == (
        pytest.approx(0.1))
    assert TfKDVirtual(student="mlp", num_classes=10, in_chans=1, alpha=0.3, ce_weight=1.0).hparams.ce_weight == 1.0


def test_tfkd_virtual_needs_no_teacher_and_others_do():
    model = TfKDVirtual(student="mlp", num_classes=10, in_chans=1)
    assert model.teacher is None and not TfKDVirtual.requires_teacher
    for method in (RLD, MLKD, TfKDSelf):
        with pytest.raises(ValueError, match="needs a teacher"):
            method(student="mlp", num_classes=10, in_chans=1)


def test_tfkd_virtual_defaults_and_loss_are_the_official_regularization():
    model = TfKDVirtual(student="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.temperature, hp.multiplier, hp.correct_prob) == (0.1, 20.0, 100.0, 0.99)
    assert hp.ce_weight == pytest.approx(0.9)
    student, _, target = logits_pair()
    loss = method_losses(model, student, None, target)["virtual"]
    assert torch.allclose(loss, 0.1 * 100.0 / 10 * virtual_teacher_loss(student, target, 0.99, 20.0))
    # official: alpha * multiplier * nn.KLDivLoss()(log_softmax(s), softmax(p_d / T)), a mean over the B * C entries
    designed = virtual_teacher_probs(target, 10, 0.99)
    entries = torch.nn.functional.kl_div(torch.log_softmax(student, 1), torch.softmax(designed / 20.0, 1),
                                         reduction="sum") / student.numel()
    official = 0.1 * 100.0 * entries
    assert torch.allclose(loss, official, rtol=1e-5)


def test_tfkd_virtual_teacher_distribution_by_hand():
    # 2 samples x 3 classes, labels (1, 0), a = 0.9: the designed teacher is 0.9 on the label, 0.05 elsewhere;
    # softened at T = 2 as softmax(p_d / 2): label e^0.45 / (e^0.45 + 2 e^0.025), others e^0.025 / (same)
    designed = virtual_teacher_probs(torch.tensor([1, 0]), 3, correct_prob=0.9)
    torch.testing.assert_close(designed, torch.tensor([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]]))
    z = torch.tensor(0.45).exp() + 2 * torch.tensor(0.025).exp()
    high, low = (torch.tensor(0.45).exp() / z).item(), (torch.tensor(0.025).exp() / z).item()
    softened = torch.tensor([[low, high, low], [high, low, low]])
    model = TfKDVirtual(student="mlp", num_classes=3, in_chans=1, correct_prob=0.9, temperature=2.0, alpha=0.5,
                        multiplier=3.0)
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    log_p_s = torch.log_softmax(student, dim=1)
    by_hand = (softened * (softened.log() - log_p_s)).sum(dim=1).mean()
    loss = method_losses(model, student, None, torch.tensor([1, 0]))["virtual"]
    assert loss.item() == pytest.approx(0.5 * 3.0 / 3 * by_hand.item(), rel=1e-5)


def test_tfkd_virtual_with_a_teacher_only_measures_it(digits):
    model = TfKDVirtual(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, digits)
    assert {k for k in trainer.callback_metrics if k.startswith("train/loss_")} == {"train/loss_ce",
                                                                                  "train/loss_virtual"}
    (validated,) = trainer.validate(model, digits, verbose=False)
    assert {"val/acc", "val/agreement", "val/teacher_acc", "val/kl"} <= set(validated)


@pytest.mark.parametrize("method,teacher", [(TfKDSelf, "cnn_tiny"), (TfKDVirtual, None)])
def test_tfkd_restores_from_a_checkpoint(method, teacher, digits, tmp_path):
    model = method(student="cnn_tiny", teacher=teacher, num_classes=10, in_chans=1, alpha=0.8, temperature=3.0)
    trainer = make_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "method.ckpt")
    restored = method.load_from_checkpoint(tmp_path / "method.ckpt")
    assert restored.hparams.ce_weight == pytest.approx(0.2)
    assert (restored.hparams.alpha, restored.hparams.temperature) == (0.8, 3.0)
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, restored.student.state_dict()[key])
