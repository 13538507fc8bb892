"""Tests of lightning_kd.methods.ctkd (CTKD)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_trainer
from helpers import at_epoch, logits_pair, method_losses
from lightning_kd.losses import kd_loss
from lightning_kd.methods import CTKD


def test_ctkd_temperature_is_trained_adversarially_within_its_range(digits, monkeypatch):
    model = CTKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, lambda_epochs=1)
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(model.temperature) in optimized, "the learnable temperature must be optimized with the student"
    student, teacher, target = logits_pair()
    at_epoch(monkeypatch, CTKD, 5)  # past the curriculum: full gradient reversal
    loss = method_losses(model, student.requires_grad_(), teacher, target)["kd"]
    loss.backward()
    initial = 1 + 20 / (1 + math.exp(-1.0))
    temperature = torch.tensor(initial, requires_grad=True)
    (0.9 * kd_loss(student.detach(), teacher, temperature)).backward()
    d_temperature_d_theta = 20 * math.exp(-1.0) / (1 + math.exp(-1.0)) ** 2
    # gradient reversal: theta's gradient is the negative of the true one, so SGD ascends the KD loss
    expected = -temperature.grad.item() * d_temperature_d_theta
    assert model.temperature.grad.item() == pytest.approx(expected, rel=1e-4)
    monkeypatch.undo()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, digits)
    assert 1.0 <= trainer.callback_metrics["train/temperature"].item() <= 21.0
