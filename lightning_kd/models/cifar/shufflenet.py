"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) for CIFAR, as used by CRD/RepDistiller and
mdistiller (their ``ShuffleV1``: 3 groups, stages of 240/480/960 channels; ``ShuffleV2``: width 1×, 116/232/464
channels and a 1024-channel head).

Both replace the ImageNet stem by a 1×1 conv to 24 channels (no stride, no max-pooling), so a 32×32 input reaches the
head at 4×4; each of the three stages halves the resolution in its first block. As in the published code, the V1 unit
has a ReLU after its depthwise conv, and a V2 stage is a down-sampling unit followed by ``n`` basic units. State-dict
keys are the published ones: ``conv1``, ``bn1``, ``layer{1,2,3}.<i>.conv<k>``/``bn<k>`` (k ≤ 3 in V1 units and V2
basic units, ≤ 5 in V2 down-sampling units), V2's ``conv2``/``bn2`` head, and ``linear``.

Features: ``stage_names()`` is ``["relu", "layer1", "layer2", "layer3"]`` (stem after its ReLU, then the stages'
outputs). ``stage_names(preact=True)`` replaces each stage with its last unit's ``preact``: in V1 the residual sum
before the final ReLU; in V2, as in RepDistiller, the concatenation of the passed-through half and the branch before
its last ReLU, taken before the channel shuffle. The pooled embedding is ``avgpool``'s output (in V2 after the
``conv2``-``bn2``-ReLU head); the classifier is ``linear`` (also readable as ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.cifar.common import (GlobalAvgPool, ZooModel, channel_shuffle, conv1x1,
                                              conv3x3)
from lightning_kd.models.registry import register_model

STEM_CHANNELS = 24


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1 to ``cout / 4`` channels-BN-ReLU, channel shuffle, 3×3 depthwise-BN-ReLU, grouped 1×1-BN; added to
    the input, or with stride 2 concatenated with the 3×3 average-pooled input; then ReLU.

    ``cout`` is the unit's own output: with stride 2 the stage width minus the input width. ``first_groups`` is the
    groups of the first 1×1 conv (1 for the network's first unit, whose 24 input channels are too few to group).
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid = cout // 4
        self.first_groups = first_groups
        self.conv1 = conv1x1(cin, mid, groups=first_groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, cout, groups=groups)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = stride == 2
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if self.downsample else nn.Identity()
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        out = torch.cat([out, shortcut], 1) if self.downsample else out + shortcut
        return F.relu(self.preact(out))


class ShuffleNetV1(ZooModel):
    """The 1×1 stem, three stages of ShuffleNet V1 units of ``widths`` channels and ``depths`` units, ``linear``."""

    classifier_name = "linear"

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960), depths: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = conv1x1(in_chans, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        cin = STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths)):
            units = [ShuffleV1Unit(cin, width - cin, 2, groups, 1 if s == 0 else groups)]
            units += [ShuffleV1Unit(width, width, 1, groups, groups) for _ in range(depth - 1)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*units))
            cin = width
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(cin, num_classes)
        self._stages = ["relu", "layer1", "layer2", "layer3"]
        self._preact_stages = ["relu"] + [f"layer{s + 1}.{d - 1}.preact" for s, d in enumerate(depths)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x))


class ShuffleV2Unit(nn.Module):
    """The ShuffleNet V2 basic unit: split the channels in half, pass the first half through, send the second through
    1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN-ReLU, concatenate and shuffle in 2 groups."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv3x3(half, half, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        self.preact(torch.cat([kept, branch], 1))  # only for forward hooks: the unit's output shuffles the halves
        return channel_shuffle(torch.cat([kept, F.relu(branch)], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """The ShuffleNet V2 down-sampling unit: two stride-2 branches of ``cout / 2`` channels each, concatenated and
    shuffled in 2 groups. Left: 3×3 depthwise-BN, 1×1-BN-ReLU. Right: 1×1-BN-ReLU, 3×3 depthwise-BN,
    1×1-BN-ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = conv3x3(cin, cin, stride=2, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = conv1x1(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(cin, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = conv3x3(mid, mid, stride=2, groups=mid)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ZooModel):
    """The 1×1 stem, three stages (a down-sampling unit then ``depths`` basic units of ``widths`` channels), a 1×1
    conv-BN-ReLU head of ``head_channels``, ``linear``."""

    classifier_name = "linear"

    def __init__(self, widths: tuple[int, int, int] = (116, 232, 464), depths: tuple[int, int, int] = (3, 7, 3),
                 head_channels: int = 1024, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        self.conv1 = conv1x1(in_chans, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        cin = STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths)):
            units = [ShuffleV2DownUnit(cin, width)] + [ShuffleV2Unit(width) for _ in range(depth)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*units))
            cin = width
        self.conv2 = conv1x1(cin, head_channels)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(head_channels, num_classes)
        self._stages = ["relu", "layer1", "layer2", "layer3"]
        self._preact_stages = ["relu"] + [f"layer{s + 1}.{d}.preact" for s, d in enumerate(depths)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x))


@register_model
def ShuffleV1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ShuffleNetV1:  # noqa: N802
    """ShuffleNet V1, 3 groups (0.95M parameters for CIFAR-100; a common student)."""
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def ShuffleV2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ShuffleNetV2:  # noqa: N802
    """ShuffleNet V2, width 1× (1.36M parameters for CIFAR-100; a common student)."""
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
