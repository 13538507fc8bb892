"""Tests of lightning_kd.methods.projectorkd (ProjectorKD)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer
from lightning_kd.methods import ProjectorKD


def test_users_own_modules_with_explicit_names():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="no feature interface.*pass the module names explicitly"):
        ProjectorKD(student=student, teacher=teacher, num_classes=4)
    model = ProjectorKD(student=student, teacher=teacher, num_classes=4, student_layer="2:input",
                        teacher_layer="1")
    x = torch.randn(32, 20)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=16))
    assert tuple(model.hparams.input_shape) == (20,)
    assert (model.projector.linear.in_features, model.projector.linear.out_features) == (16, 64)
    assert torch.isfinite(trainer.callback_metrics["train/loss_logsum"])
