"""Tests of lightning_kd.methods.rld (RLD)."""

from __future__ import annotations

import torch

from helpers import at_epoch, logits_pair, method_losses
from lightning_kd.losses.logit_refined import rld_loss
from lightning_kd.methods.rld import RLD


def test_rld_defaults_are_the_official_cifar_setting_and_warm_up_from_epoch_one(monkeypatch):
    model = RLD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.beta, hp.temperature, hp.confidence_temperature, hp.warmup_epochs, hp.ce_weight) == (
        1.0, 8.0, 4.0, None, 20, 1.0)
    student, teacher, target = logits_pair()
    full = rld_loss(student, teacher, target, 1.0, 8.0, 4.0)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        at_epoch(monkeypatch, RLD, epoch)
        assert torch.allclose(method_losses(model, student, teacher, target)["rld"], ramp * full), f"epoch {epoch}"


def test_rld_passes_its_confidence_temperature():
    model = RLD(student="mlp", teacher="mlp", num_classes=10, in_chans=1, confidence_temperature=1.0,
                warmup_epochs=0)
    student, teacher, target = logits_pair(1)
    expected = rld_loss(student, teacher, target, 1.0, 8.0, 4.0, confidence_temperature=1.0)
    assert torch.allclose(method_losses(model, student, teacher, target)["rld"], expected)
