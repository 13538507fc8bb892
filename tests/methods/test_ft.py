"""Tests of lightning_kd.methods.ft (FT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import hooked_features
from lightning_kd.losses.feature import ft_loss
from lightning_kd.methods.base import Batch
from lightning_kd.methods.ft import FT


def test_ft_losses_are_the_functional_losses_on_the_hooked_features():
    torch.manual_seed(0)
    model = FT(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    hp = model.hparams
    assert (hp.ft_weight, hp.init_epochs, hp.init_lr, hp.rate, hp.p) == (200.0, 30, 0.01, 0.5, 1.0)
    assert model.paraphraser.encoder[-2].out_channels == 128 and model.translator.encoder[0].in_channels == 256
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    with torch.no_grad():
        t, = hooked_features(model.teacher, ["layer3"], x)
    init = model.init_losses(batch)
    torch.testing.assert_close(init["reconstruction"], F.mse_loss(model.paraphraser(t)[1], t))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    s, = hooked_features(model.student, ["layer3"], x)
    losses = model.distillation_losses(batch, student_out, teacher_out)
    expected = 200.0 * ft_loss(model.translator(s), model.paraphraser.encode(t), 1.0, 2.0)
    torch.testing.assert_close(losses["ft"], expected)
    assert set(losses) == {"ft"} and expected > 0
    losses["ft"].backward()
    assert all(p.grad is None for p in model.paraphraser.parameters()), "the teacher's factor carries no gradient"
    assert all(p.grad is not None for p in model.translator.parameters())
