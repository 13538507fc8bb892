"""Tests of lightning_kd.methods.ofd (OFD)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import hooked_features
from helpers import FUSION_PAIRS, ZOO_PREACT, fusion_kd
from lightning_kd.losses.feature_fusion import ofd_loss, ofd_margin_from_bn
from lightning_kd.methods import Batch
from lightning_kd.methods.ofd import OFD
from lightning_kd.models import create_model
from lightning_kd.nn.projectors import ConvBN


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm affine parameters (γ of both signs, β around 0), so that margins differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("pair, stages", [("digits", {"stages.1.1.2:input": "stages.1"}),
                                          ("timm", {f"layer{i}.1.act2:input": f"layer{i}" for i in (1, 2, 3, 4)})])
def test_teacher_features_are_taken_before_the_relu(pair, stages):
    torch.manual_seed(0)
    model = fusion_kd("OFD", pair)
    randomize_batchnorms(model.teacher)
    randomize_batchnorms(model.student, seed=1)  # timm zero-initialises the last BN of each block
    x = torch.randn(2, *((1, 8, 8) if pair == "digits" else (3, 32, 32)))
    features = model.forward_teacher(Batch(x, torch.zeros(2, dtype=torch.long))).features
    with torch.no_grad():
        outputs = hooked_features(model.teacher, list(stages.values()), x)
    for layer, output in zip(stages, outputs):
        assert (features[layer] < 0).any(), f"{layer} holds no negative value: it was captured after the ReLU"
        torch.testing.assert_close(F.relu(features[layer]), output)
    student_features = model.forward_student(Batch(x, torch.zeros(2, dtype=torch.long))).features
    assert all((feature < 0).any() and feature.requires_grad for feature in student_features.values())


@pytest.mark.parametrize("pair, bns", [("digits", ["stages.1.1.1"]),
                                       ("resnet", [f"layer{i}.4.bn2" for i in (1, 2, 3)]),
                                       ("timm", [f"layer{i}.1.bn2" for i in (1, 2, 3, 4)])])
def test_margins_come_from_the_batchnorm_before_each_teacher_relu(pair, bns):
    student, teacher, num_classes, in_chans = FUSION_PAIRS[pair]
    teacher = randomize_batchnorms(create_model(teacher, num_classes=num_classes, in_chans=in_chans))
    shape = (1, 8, 8) if pair == "digits" else (3, 32, 32)
    model = OFD(student=student, teacher=teacher, num_classes=num_classes, in_chans=in_chans, input_shape=shape)
    assert model.teacher_bns == bns
    assert len(model.margins) == len(bns)
    for margin, bn in zip(model.margins, bns):
        expected = ofd_margin_from_bn(teacher.get_submodule(bn))
        assert torch.equal(margin, expected) and margin.std() > 0


def test_ofd_loss_is_the_weighted_sum_of_the_functional_losses():
    torch.manual_seed(0)
    teacher = randomize_batchnorms(create_model("resnet32x4", num_classes=100))
    model = OFD(student="resnet8x4", teacher=teacher, num_classes=100, input_shape=(3, 32, 32))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    losses = model.distillation_losses(batch, model.forward_student(batch), model.forward_teacher(batch))
    student_feats = hooked_features(model.student, ZOO_PREACT["student"], x)
    with torch.no_grad():
        teacher_feats = hooked_features(model.teacher, ZOO_PREACT["teacher"], x)
    terms = [ofd_loss(connector(s), t, margin)
             for connector, s, t, margin in zip(model.connectors, student_feats, teacher_feats, model.margins)]
    expected = 1e-3 * (terms[0] / 4 + terms[1] / 2 + terms[2])
    assert set(losses) == {"ofd"} and all(term > 0 for term in terms)
    torch.testing.assert_close(losses["ofd"], expected)
    losses["ofd"].backward()
    assert all(p.grad is not None for p in model.connectors.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_ofd_connectors_are_conv_bn_sized_from_the_dry_run():
    model = fusion_kd("OFD", "digits", input_shape=(1, 8, 8))
    connector, = model.connectors
    assert isinstance(connector, ConvBN) and not connector.relu
    assert (connector.conv.in_channels, connector.conv.out_channels, connector.conv.kernel_size) == (16, 32, (1, 1))
