"""Adapters of the feature methods that learn more than a projection: VID's Gaussian regressor, Factor Transfer's
paraphraser and translator, and the connectors of AB and FSP.

All are sized from feature shapes found by a dry forward pass (:func:`lightning_kd.features.feature_shapes`),
never from channel counts typed by the user.

>>> import torch
>>> paraphraser = Paraphraser(64)
>>> factor, reconstruction = paraphraser(torch.zeros(2, 64, 8, 8))
>>> factor.shape, reconstruction.shape
(torch.Size([2, 32, 8, 8]), torch.Size([2, 64, 8, 8]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.nn.projectors import ConvBN, ConvReg


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    """The variational distribution of VID (Ahn et al., CVPR 2019) for one stage: a mean regressed from the student
    feature by three 1×1 convolutions (ReLU between them, no bias) and a learnt variance per teacher channel,
    ``softplus(α_c) + eps``, starting at ``init_variance`` (RepDistiller ``VIDLoss``: hidden width = teacher
    channels, initial variance 5, eps 1e-5)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None,
                 init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()
        if init_variance <= eps:
            raise ValueError(f"init_variance must exceed eps={eps}, got {init_variance}")
        hidden = hidden_channels or out_channels
        self.regressor = nn.Sequential(_conv1x1(in_channels, hidden), nn.ReLU(), _conv1x1(hidden, hidden), nn.ReLU(),
                                       _conv1x1(hidden, out_channels))
        self.log_scale = nn.Parameter(torch.full((out_channels,), math.log(math.expm1(init_variance - eps))))
        self.eps = eps

    def variance(self) -> Tensor:
        """``(C_t,)`` predicted variances."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student_feat: Tensor) -> Tensor:
        """The predicted mean of the teacher feature."""
        return self.regressor(student_feat)


def _conv_stack(channels: Sequence[int], transposed: bool, batch_norm: bool) -> nn.Sequential:
    """3×3 (transposed) convolutions of stride 1 between consecutive widths, each → [BatchNorm] → LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers.append(conv(cin, cout, kernel_size=3, stride=1, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def factor_channels(teacher_channels: int, rate: float) -> int:
    """Channels of Factor Transfer's factors: ``int(rate · C_t)`` (RepDistiller's ``k``)."""
    channels = int(teacher_channels * rate)
    if channels < 1:
        raise ValueError(f"rate={rate} leaves no factor channels for a teacher feature of {teacher_channels} channels: "
                         "use a larger rate")
    return channels


class Paraphraser(nn.Module):
    """Factor Transfer's paraphraser (Kim et al., NeurIPS 2018): a convolutional autoencoder of the teacher's
    feature whose code, the *factor*, has ``rate · C`` channels. Encoder: three 3×3 convolutions ``C → C → rate·C
    → rate·C``; decoder: three transposed ones back; LeakyReLU(0.1) after each, no BatchNorm (RepDistiller
    ``models/util.py``, ``k=0.5``, ``use_bn=False``)."""

    def __init__(self, channels: int, rate: float = 0.5, batch_norm: bool = False):
        super().__init__()
        factor = factor_channels(channels, rate)
        self.encoder = _conv_stack([channels, channels, factor, factor], transposed=False, batch_norm=batch_norm)
        self.decoder = _conv_stack([factor, factor, channels, channels], transposed=True, batch_norm=batch_norm)

    def encode(self, teacher_feat: Tensor) -> Tensor:
        """The teacher factor."""
        return self.encoder(teacher_feat)

    def forward(self, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        """The factor and the reconstructed feature."""
        factor = self.encoder(teacher_feat)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Factor Transfer's translator: three 3×3 convolutions ``C_s → C_s → F → F`` with BatchNorm and LeakyReLU(0.1)
    mapping the student's feature to a factor of ``F`` channels (RepDistiller ``models/util.py``, ``use_bn=True``)."""

    def __init__(self, in_channels: int, factor_channels: int, batch_norm: bool = True):
        super().__init__()
        self.encoder = _conv_stack([in_channels, in_channels, factor_channels, factor_channels], transposed=False,
                                   batch_norm=batch_norm)

    def forward(self, student_feat: Tensor) -> Tensor:
        return self.encoder(student_feat)


def boundary_connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """AB's connector from a student pre-activation of ``student_shape`` to the teacher's (``(N, C, H, W)``): the
    identity when channels and height agree, else :class:`~lightning_kd.nn.projectors.ConvReg` without ReLU (a 1×1
    convolution and BatchNorm at equal sizes), as RepDistiller's ``Connector``."""
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(f"AB connects (N, C, H, W) feature maps, got shapes {tuple(student_shape)} and "
                         f"{tuple(teacher_shape)}: hook convolutional layers")
    if student_shape[1] == teacher_shape[1] and student_shape[2] == teacher_shape[2]:
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, relu=False)


def channel_connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """A 1×1 convolution and BatchNorm to the teacher's channel count (:class:`~lightning_kd.nn.projectors.ConvBN`),
    or the identity when the counts agree."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return ConvBN(student_channels, teacher_channels)


__all__ = ["Paraphraser", "Translator", "VIDRegressor", "boundary_connector", "channel_connector", "factor_channels"]
