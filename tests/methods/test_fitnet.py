"""Tests of lightning_kd.methods.fitnet (FitNet)."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.losses import fitnet_loss
from lightning_kd.methods import Batch, FitNet
from lightning_kd.nn import PROJECTORS


@pytest.mark.parametrize("projector", PROJECTORS)
def test_fitnet_takes_every_projector(projector):
    torch.manual_seed(0)
    model = FitNet(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, projector=projector,
                   input_shape=(1, 8, 8))
    batch = Batch(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    loss = model.distillation_losses(batch, student_out, teacher_out)["fitnet"]
    expected = 100.0 * fitnet_loss(model.projector(student_out.features["stages.1"]), teacher_out.features["stages.1"])
    assert torch.allclose(loss, expected)
