"""MobileNetV2 for CIFAR at half width (Sandler et al., CVPR 2018), the student CRD/RepDistiller and mdistiller call
``MobileNetV2`` (their ``mobile_half``: expansion 6, width multiplier 0.5).

A 3×3 stride-2 stem, seven groups of inverted residual blocks (the ImageNet table with strides 1, 1, 2, 2, 1, 2, 1,
so a 32×32 input ends at 2×2), a 1×1 conv to 1280 channels, global average pooling and a linear classifier. As in
the published code, every block has its 1×1 expansion conv, even at expansion 1, and the last channel count stays
1280 at width 0.5. State-dict keys are the published ones (``conv1.{0,1}``, ``blocks.<g>.<i>.conv.{0,1,3,4,6,7}``,
``conv2.{0,1}``, ``classifier.0``).

Features: ``stage_names()`` is ``["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]`` (the stem after its ReLU,
then the groups RepDistiller returns with ``is_feat=True``); block outputs are linear bottlenecks without a ReLU, so
``stage_names(preact=True)`` is the same list. The pooled embedding is ``avgpool``'s output; the classifier is
``classifier.0`` (also readable as ``fc``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.cifar.common import GlobalAvgPool, ZooModel, conv1x1, conv3x3, init_weights
from lightning_kd.models.registry import register_model

# (expansion, channels, blocks, stride of the first block); expansion None means the model's ``expansion``.
INVERTED_RESIDUAL_GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                            (None, 160, 3, 2), (None, 320, 1, 1))


def conv_bn_relu(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU (carrying the stride), 1×1 project-BN; identity shortcut when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_shortcut = stride == 1 and cin == cout
        expand = conv_bn_relu(conv1x1(cin, hidden))
        depthwise = conv_bn_relu(conv3x3(hidden, hidden, stride, groups=hidden))
        self.conv = nn.Sequential(*expand, *depthwise, conv1x1(hidden, cout), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


class CifarMobileNetV2(ZooModel):
    """MobileNetV2 with ``expansion`` and ``width_mult`` (the zoo's ``MobileNetV2`` is 6 and 0.5)."""

    classifier_name = "classifier.0"

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = conv_bn_relu(conv3x3(in_chans, cin, stride=2))
        groups = []
        for t, channels, depth, stride in INVERTED_RESIDUAL_GROUPS:
            cout = int(channels * width_mult)
            blocks = []
            for i in range(depth):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, t or expansion))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(conv1x1(cin, last_channels))
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.avgpool = GlobalAvgPool()
        init_weights(self, linear_std=0.01)
        self._stages = ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        self._preact_stages = list(self._stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)))


@register_model
def MobileNetV2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CifarMobileNetV2:  # noqa: N802
    """MobileNetV2 at half width with expansion 6 (0.81M parameters for CIFAR-100; a common student)."""
    return CifarMobileNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
