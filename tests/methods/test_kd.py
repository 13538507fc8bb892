"""Tests of lightning_kd.methods.kd (KD)."""

from __future__ import annotations

import torch

from helpers import logits_pair, method_losses
from lightning_kd.losses import kd_loss, standardize_logits
from lightning_kd.methods import KD


def test_kd_defaults_are_the_papers_and_loss_is_kd_loss():
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.temperature, model.hparams.ce_weight, model.hparams.kd_weight) == (4.0, 0.1, 0.9)
    student, teacher, target = logits_pair()
    loss = method_losses(model, student, teacher, target)["kd"]
    assert torch.allclose(loss, 0.9 * kd_loss(student, teacher, 4.0))


def test_standardize_switch_applies_logit_standardization():
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True, temperature=2.0)
    student, teacher, target = logits_pair()
    loss = method_losses(model, student, teacher, target)["kd"]
    expected = 0.9 * kd_loss(standardize_logits(student), standardize_logits(teacher), 2.0)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, 0.9 * kd_loss(student, teacher, 2.0))
