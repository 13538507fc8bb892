"""Tests of lightning_kd.methods.normkd (NormKD)."""

from __future__ import annotations

import torch

from helpers import logits_pair, method_losses
from lightning_kd.losses import normkd_loss
from lightning_kd.methods import NormKD


def test_normkd_uses_normkd_loss():
    model = NormKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    student, teacher, target = logits_pair()
    expected = model.hparams.kd_weight * normkd_loss(student, teacher, model.hparams.temperature_scale)
    assert torch.allclose(method_losses(model, student, teacher, target)["kd"], expected)
