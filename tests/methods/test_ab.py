"""Tests of lightning_kd.methods.ab (AB)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from conftest import hooked_features
from lightning_kd.losses.feature import ab_loss
from lightning_kd.methods.ab import AB
from lightning_kd.methods.base import Batch


def test_ab_init_loss_is_the_stage_weighted_functional_loss():
    torch.manual_seed(0)
    model = AB(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert all(isinstance(c, nn.Identity) for c in model.connectors), "equal shapes need no connector"
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    model.train()
    loss = model.init_losses(batch)
    s = hooked_features(model.student, model.student_layers, x)
    with torch.no_grad():
        t = hooked_features(model.teacher, model.teacher_layers, x)
    expected = 3e-3 * (0.25 * ab_loss(s[0], t[0]) + 0.5 * ab_loss(s[1], t[1]) + ab_loss(s[2], t[2]))
    assert set(loss) == {"ab"}
    torch.testing.assert_close(loss["ab"], expected)
    # pre-activations: negative values survive, unlike the stage outputs after their ReLU
    assert all((f < 0).any() for f in s + t)
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert model.distillation_losses(batch, student_out, teacher_out) == {}, "after the init phase: CE alone"


def test_ab_takes_the_inputs_of_the_last_relus_of_models_without_pre_activation_features():
    """Small CNNs and timm models list no pre-activations: AB hooks the input of each stage's last ReLU, which
    holds the pre-activation values even where that ReLU is in-place."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = AB(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, init_epochs=1)
    assert model.student_layers == model.teacher_layers == ["stages.1.1.2:input"]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher = model.teacher
    with torch.no_grad():  # the stem, then the stage's pool, conv and BatchNorm: the values before the ReLU
        pre = teacher.stages[1][1][1](teacher.stages[1][1][0](teacher.stages[1][0](teacher.stages[0](x))))
    teacher_out = model.forward_teacher(Batch(x, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(teacher_out.features["stages.1.1.2:input"], pre)
    assert (pre < 0).any()
