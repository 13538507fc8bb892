"""Tests of lightning_kd.methods.fsp (FSP)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import hooked_features
from helpers import ADAPTER_ZOO_LAYERS
from lightning_kd.losses.feature import fsp_loss, fsp_matrix
from lightning_kd.methods.base import Batch
from lightning_kd.methods.fsp import FSP


def test_fsp_init_loss_is_the_functional_loss_over_consecutive_stages():
    torch.manual_seed(0)
    model = FSP(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert all(isinstance(c, nn.Identity) for c in model.connectors), "equal channels need no connector"
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    model.train()
    loss = model.init_losses(batch)
    s = hooked_features(model.student, ADAPTER_ZOO_LAYERS["FSP"], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, ADAPTER_ZOO_LAYERS["FSP"], x)
    expected = sum(fsp_loss(fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])) for i in range(3))
    assert set(loss) == {"fsp"}
    torch.testing.assert_close(loss["fsp"], expected)
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert model.distillation_losses(batch, student_out, teacher_out) == {}, "after the init phase: CE alone"
