"""Tests of lightning_kd.methods.vid (VID)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import hooked_features
from helpers import ADAPTER_ZOO_LAYERS
from lightning_kd.losses.feature import vid_loss
from lightning_kd.methods.base import Batch
from lightning_kd.methods.vid import VID


def test_vid_loss_is_the_functional_loss_on_the_hooked_features():
    torch.manual_seed(0)
    model = VID(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert (model.hparams.vid_weight, model.hparams.ce_weight) == (1.0, 1.0)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    losses = model.distillation_losses(batch, student_out, teacher_out)
    s = hooked_features(model.student, ADAPTER_ZOO_LAYERS["VID"], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, ADAPTER_ZOO_LAYERS["VID"], x)
    expected = sum(vid_loss(r(a), b, r.variance()) for r, a, b in zip(model.regressors, s, t))
    assert set(losses) == {"vid"}
    torch.testing.assert_close(losses["vid"], expected)
    for regressor in model.regressors:
        torch.testing.assert_close(regressor.variance(), torch.full_like(regressor.variance(), 5.0))
    losses["vid"].backward()
    assert all(p.grad is not None for p in model.regressors.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_vid_pools_the_larger_map_before_the_regressor():
    model = VID(student="resnet8x4", teacher="resnet32x4", num_classes=100, student_layers=["layer1"],
                teacher_layers=["layer2"], input_shape=(3, 32, 32))
    regressor, = model.regressors
    assert (regressor.regressor[0].in_channels, regressor.regressor[-1].out_channels) == (64, 128)
    x = torch.randn(2, 3, 32, 32)
    batch = Batch(x, torch.zeros(2, dtype=torch.long))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    s, t = student_out.features["layer1"], teacher_out.features["layer2"]
    pooled = F.adaptive_avg_pool2d(s, (16, 16))
    torch.testing.assert_close(model.distillation_losses(batch, student_out, teacher_out)["vid"],
                               vid_loss(regressor(pooled), t, regressor.variance()))
