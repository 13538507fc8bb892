"""Small MLPs and CNNs for low-resolution data (digits 8×8, MNIST 28×28) and quick experiments.

All take ``num_classes`` and ``in_chans``; the CNNs work at any input resolution (global average pooling).
Feature access as for every registered model (:class:`~lightning_kd.models.base.ZooModel`): the stages are
``stages.<i>``, the embedding ``pool`` (``stages`` for the MLP), the classifier ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.models.base import ZooModel
from lightning_kd.models.registry import register_model


class MLP(ZooModel):
    """Flatten → ``depth`` × (Linear → ReLU) → ``fc``. Input size is fixed by ``input_size``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, input_size: int = 8, hidden: int = 128,
                 depth: int = 2):
        super().__init__()
        layers, width = [], in_chans * input_size * input_size
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.stages = nn.Sequential(nn.Flatten(), *layers)
        self.fc = nn.Linear(width, num_classes)
        self.embedding_name = "stages"
        self._stages = [f"stages.{i}" for i in range(2, 2 * depth + 1, 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SimpleCNN(ZooModel):
    """Stages of (3×3 conv → BN → ReLU) × ``convs_per_stage``, 2× max-pool between stages, global average
    pooling, then ``fc``. ``widths`` gives each stage's channels."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, ...] = (16, 32),
                 convs_per_stage: int = 1):
        super().__init__()
        stages, cin = [], in_chans
        for i, width in enumerate(widths):
            blocks = [nn.MaxPool2d(2)] if i > 0 else []
            for _ in range(convs_per_stage):
                blocks.append(_conv_bn_relu(cin, width))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        self.embedding_name = "pool"
        self._stages = [f"stages.{i}" for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(x)))


@register_model
def mlp(num_classes: int = 10, in_chans: int = 1, input_size: int = 8, **kwargs) -> nn.Module:
    """Two hidden layers of 128 units (about 26k parameters on 8×8 digits)."""
    return MLP(num_classes, in_chans, input_size, **kwargs)


@register_model
def cnn_tiny(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Two stages of 8 and 16 channels (about 1.4k parameters)."""
    return SimpleCNN(num_classes, in_chans, widths=(8, 16), **kwargs)


@register_model
def cnn_small(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Two stages of 16 and 32 channels (about 5.2k parameters)."""
    return SimpleCNN(num_classes, in_chans, widths=(16, 32), **kwargs)


@register_model
def cnn_medium(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Three stages of 32, 64 and 128 channels (about 94k parameters)."""
    return SimpleCNN(num_classes, in_chans, widths=(32, 64, 128), **kwargs)


@register_model
def cnn_large(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Three stages of 64, 128 and 256 channels, two convolutions each (about 1.1M parameters)."""
    return SimpleCNN(num_classes, in_chans, widths=(64, 128, 256), convs_per_stage=2, **kwargs)
