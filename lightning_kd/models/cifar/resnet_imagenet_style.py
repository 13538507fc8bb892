"""ResNet18 and ResNet50 for 32×32 inputs, as in CRD/RepDistiller's ``resnetv2.py`` and mdistiller.

The ImageNet stage layout (He et al., CVPR 2016: 64/128/256/512 channels, [2, 2, 2, 2] basic blocks or [3, 4, 6, 3]
bottlenecks with 4× expansion) behind a 3×3 stride-1 stem without max-pooling, so a 32×32 input reaches the head at
4×4. State-dict keys are the published ones (``conv1``, ``bn1``, ``layer{1..4}.<i>.conv{1,2,3}``/``bn{1,2,3}``,
``.shortcut.{0,1}``, ``linear``), so the CRD teacher ``ResNet50_vanilla/ckpt_epoch_240.pth`` loads strictly.

Features: ``stage_names()`` is ``["relu", "layer1", "layer2", "layer3", "layer4"]`` (stem after its ReLU, then each
stage's output, which ends with a ReLU); ``stage_names(preact=True)`` replaces each stage with its last block's
``preact``, the residual sum before that ReLU. The pooled embedding is ``avgpool``'s output; the classifier is
``linear`` (also readable as ``fc``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.cifar.common import GlobalAvgPool, ZooModel, conv1x1, conv3x3, init_weights
from lightning_kd.models.cifar.resnet import BasicBlock, projection, residual_stage
from lightning_kd.models.registry import register_model


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand by 4, each with BN; shortcut; ReLU after the sum.
    ``preact`` (an identity) outputs the sum."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut_name: str = "shortcut"):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, projection(cin, planes * self.expansion, stride))
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + getattr(self, self.shortcut_name)(x)))


class ResNet(ZooModel):
    """A 3×3 stride-1 stem of 64 channels, four stages (strides 1, 2, 2, 2), global average pooling, ``linear``."""

    classifier_name = "linear"

    def __init__(self, block: type[nn.Module], depths: tuple[int, int, int, int], num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__()
        self.conv1 = conv3x3(in_chans, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stage = residual_stage(block, cin, planes, depth, 1 if i == 0 else 2, "shortcut")
            self.add_module(f"layer{i + 1}", stage)
            cin = planes * block.expansion
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(cin, num_classes)
        init_weights(self)
        self._stages = ["relu", "layer1", "layer2", "layer3", "layer4"]
        self._preact_stages = ["relu"] + [f"layer{i + 1}.{d - 1}.preact" for i, d in enumerate(depths)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x))


@register_model
def ResNet18(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ResNet:  # noqa: N802
    """ResNet-18 with a CIFAR stem (11.22M parameters for CIFAR-100)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_chans, **kwargs)


@register_model
def ResNet50(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ResNet:  # noqa: N802
    """ResNet-50 with a CIFAR stem (23.71M parameters for CIFAR-100; a CRD teacher)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, **kwargs)
