"""Wide ResNets (Zagoruyko & Komodakis, BMVC 2016) as used by CRD/RepDistiller and mdistiller.

``wrn_<depth>_<k>``: a 3×3 stem of 16 channels, three stages of (depth - 4) / 6 pre-activation blocks with 16k, 32k
and 64k channels (strides 1, 2, 2), then BN-ReLU, global average pooling and ``fc``. State-dict keys are the published
ones (``conv1``, ``block{1,2,3}.layer.<i>.bn1``/``conv1``/``bn2``/``conv2``/``convShortcut``, ``bn1``, ``fc``), so the
CRD teacher ``wrn_40_2_vanilla/ckpt_epoch_240.pth`` loads strictly.

Features: ``stage_names()`` is ``["conv1", "block1", "block2", "block3"]``: the stem and the stages' outputs, which in
a pre-activation network carry no ReLU. ``stage_names(preact=True)`` follows RepDistiller's ``preact`` convention: the
stem, then each stage output passed through the BatchNorm that comes next (``block2.layer.0.bn1``,
``block3.layer.0.bn1`` and the final ``bn1``), before its ReLU. The pooled embedding is ``avgpool``'s output (after
the final BN-ReLU); the classifier is ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.cifar.common import GlobalAvgPool, ZooModel, conv1x1, conv3x3, init_weights
from lightning_kd.models.registry import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3, BN-ReLU-(dropout)-conv3×3, plus a shortcut. When the width changes the shortcut is a 1×1
    ``convShortcut`` applied to the block's activated input, as in the published code."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.drop_rate = drop_rate
        self.convShortcut = None if cin == cout else conv1x1(cin, cout, stride)  # noqa: N815  (the published name)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + self.conv2(out)


class WideStage(nn.Module):
    """``depth`` wide blocks under ``.layer``; the first carries the stride and the width change."""

    def __init__(self, cin: int, cout: int, depth: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                                     for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ZooModel):
    """WRN-``depth``-``widen_factor``; ``drop_rate`` is dropout inside each block (0 in the KD papers)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has 6n+4 layers, not {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_chans, widths[0])
        self.block1 = WideStage(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = WideStage(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = WideStage(widths[2], widths[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)
        self._stages = ["conv1", "block1", "block2", "block3"]
        self._preact_stages = ["conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(F.relu(self.bn1(x))))


@register_model
def wrn_16_1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> WideResNet:
    """WRN-16-1 (0.18M parameters for CIFAR-100)."""
    return WideResNet(16, 1, num_classes, in_chans, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> WideResNet:
    """WRN-16-2 (0.70M parameters for CIFAR-100; the usual student of wrn_40_2)."""
    return WideResNet(16, 2, num_classes, in_chans, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> WideResNet:
    """WRN-40-1 (0.57M parameters for CIFAR-100)."""
    return WideResNet(40, 1, num_classes, in_chans, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> WideResNet:
    """WRN-40-2 (2.26M parameters for CIFAR-100; a CRD teacher)."""
    return WideResNet(40, 2, num_classes, in_chans, **kwargs)
