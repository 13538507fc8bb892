"""Tests of lightning_kd.methods.dist (DIST)."""

from __future__ import annotations

import torch

from helpers import logits_pair, method_losses
from lightning_kd.losses import dist_loss
from lightning_kd.methods import DIST


def test_dist_defaults_are_the_cifar_setting():
    model = DIST(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.beta, model.hparams.gamma, model.hparams.temperature, model.hparams.ce_weight) == (
        2.0, 2.0, 4.0, 1.0)
    student, teacher, target = logits_pair()
    assert torch.allclose(method_losses(model, student, teacher, target)["dist"], dist_loss(student, teacher, 2, 2, 4))
