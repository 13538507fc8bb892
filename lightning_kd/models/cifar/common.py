"""Parameter-free parts and initialisation shared by the CIFAR zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.base import ZooModel  # noqa: F401  (re-exported for the zoo modules)


class GlobalAvgPool(nn.Module):
    """Global average pooling to an ``(N, C)`` embedding: the published models' ``avg_pool2d`` over the whole last
    feature map at 32×32 input, written so any input size works."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: view channels as ``(groups, C/groups)``, transpose, flatten back."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, groups=groups, bias=False)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """The reference repositories' initialisation: convolutions He-normal over fan-out with zero bias, BatchNorm
    weight 1 and bias 0; linear layers ``N(0, linear_std)`` with zero bias when ``linear_std`` is given, else left at
    PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
