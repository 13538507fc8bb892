"""Tests of lightning_kd.methods.dkd (DKD)."""

from __future__ import annotations

import torch

from helpers import at_epoch, logits_pair, method_losses
from lightning_kd.losses import dkd_loss
from lightning_kd.methods import DKD


def test_dkd_warms_up_linearly_over_epochs_counted_from_one(monkeypatch):
    model = DKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.alpha, model.hparams.beta, model.hparams.temperature, model.hparams.warmup_epochs) == (
        1.0, 8.0, 4.0, 20)
    student, teacher, target = logits_pair()
    full = dkd_loss(student, teacher, target, 1.0, 8.0, 4.0)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        at_epoch(monkeypatch, DKD, epoch)
        loss = method_losses(model, student, teacher, target)["dkd"]
        assert torch.allclose(loss, ramp * full), f"epoch {epoch}"
