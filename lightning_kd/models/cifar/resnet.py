"""CIFAR ResNets (He et al., CVPR 2016, section 4.2) as used by CRD/RepDistiller and mdistiller.

``resnet{8,14,20,32,44,56,110}`` have 6n+2 layers: a 3×3 stem of 16 channels and three stages of n basic blocks
with 16, 32 and 64 channels (strides 1, 2, 2). ``resnet8x4`` and ``resnet32x4`` widen the stem and stages to 32 and
64/128/256. The state-dict keys and shapes are the published ones (``conv1``, ``bn1``, ``layer{1,2,3}.<i>.conv1``
… ``.downsample.{0,1}``, ``fc``), so the CRD teachers' ``<name>_vanilla/ckpt_epoch_240.pth`` load strictly.

Features: ``stage_names()`` is ``["relu", "layer1", "layer2", "layer3"]`` (stem after its ReLU, then each stage's
output, which ends with a ReLU); ``stage_names(preact=True)`` replaces each stage with its last block's ``preact``,
the residual sum before that ReLU. The pooled embedding is ``avgpool``'s output; the classifier is ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.cifar.common import GlobalAvgPool, ZooModel, conv1x1, conv3x3, init_weights
from lightning_kd.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut, ReLU after the sum; ``preact`` (an identity) outputs the sum.

    The shortcut is a 1×1 conv-BN projection when stride or width change, stored under ``shortcut_name``
    (``downsample`` in the CIFAR ResNets, ``shortcut`` in ResNet18) so the published keys load.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut_name: str = "downsample"):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, projection(cin, planes * self.expansion, stride))
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + getattr(self, self.shortcut_name)(x)))


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """The residual shortcut: a 1×1 conv-BN when stride or width change, else an identity (``nn.Sequential()``,
    which has no state-dict entries)."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def residual_stage(block: type[nn.Module], cin: int, planes: int, depth: int, stride: int,
                   shortcut_name: str) -> nn.Sequential:
    """``depth`` blocks of width ``planes``; the first has ``stride`` and takes ``cin`` channels."""
    blocks = [block(cin, planes, stride, shortcut_name=shortcut_name)]
    blocks += [block(planes * block.expansion, planes, 1, shortcut_name=shortcut_name) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class CifarResNet(ZooModel):
    """A 3×3 stem, three stages of ``(depth - 2) / 6`` basic blocks (strides 1, 2, 2), global average pooling, ``fc``.

    ``widths`` is (stem, stage1, stage2, stage3) channels.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has 6n+2 layers, not {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = residual_stage(BasicBlock, widths[0], widths[1], n, 1, "downsample")
        self.layer2 = residual_stage(BasicBlock, widths[1], widths[2], n, 2, "downsample")
        self.layer3 = residual_stage(BasicBlock, widths[2], widths[3], n, 2, "downsample")
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        self._stages = ["relu", "layer1", "layer2", "layer3"]
        self._preact_stages = ["relu"] + [f"layer{i}.{n - 1}.preact" for i in (1, 2, 3)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x))


NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-8 (0.08M parameters for CIFAR-100)."""
    return CifarResNet(8, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet14(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-14 (0.18M parameters for CIFAR-100)."""
    return CifarResNet(14, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet20(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-20 (0.28M parameters for CIFAR-100)."""
    return CifarResNet(20, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-32 (0.47M parameters for CIFAR-100)."""
    return CifarResNet(32, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet44(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-44 (0.67M parameters for CIFAR-100)."""
    return CifarResNet(44, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet56(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-56 (0.86M parameters for CIFAR-100; a CRD teacher)."""
    return CifarResNet(56, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet110(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-110 (1.74M parameters for CIFAR-100; a CRD teacher)."""
    return CifarResNet(110, NARROW, num_classes, in_chans, **kwargs)


@register_model
def resnet8x4(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-8 with 4× wider stages (1.23M parameters for CIFAR-100; the usual student of resnet32x4)."""
    return CifarResNet(8, WIDE, num_classes, in_chans, **kwargs)


@register_model
def resnet32x4(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-32 with 4× wider stages (7.43M parameters for CIFAR-100; a CRD teacher)."""
    return CifarResNet(32, WIDE, num_classes, in_chans, **kwargs)
