"""Projectors: small trainable maps from a student feature to the teacher's feature space.

Every projector maps ``(N, C_s)`` embeddings or ``(N, C_s, H, W)`` feature maps channel-wise (:class:`ConvReg`
only maps feature maps, and may also change their spatial size). Methods never ask the user for channel
counts: they run the models once on a dummy input (:func:`lightning_kd.features.feature_shapes`) and hand the
shapes to :func:`build_projector`.

>>> import torch
>>> projector = build_projector("conv_reg", torch.Size([2, 64, 8, 8]), torch.Size([2, 256, 8, 8]))
>>> projector(torch.zeros(2, 64, 8, 8)).shape
torch.Size([2, 256, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _over_channels(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a layer of the last dimension to dimension 1 of ``(N, C)`` or ``(N, C, *spatial)``."""
    if x.dim() == 2:
        return layer(x)
    return layer(x.movedim(1, -1)).movedim(-1, 1)


class ChannelBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over dimension 1 of ``(N, C)`` or ``(N, C, *spatial)`` (statistics over the batch and all
    positions, as ``BatchNorm2d`` for feature maps)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= 3:
            return super().forward(x)
        return super().forward(x.flatten(2)).view_as(x)


class Linear(nn.Module):
    """A linear map of the channels: ``nn.Linear`` on embeddings, a 1×1 convolution on feature maps."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return _over_channels(self.linear, x)


class MLP(nn.Module):
    """Linear → BatchNorm → ReLU → Linear over the channels; ``hidden_channels`` defaults to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or out_channels
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.bn = ChannelBatchNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.bn(_over_channels(self.fc1, x)))
        return _over_channels(self.fc2, hidden)


class ConvBN(nn.Module):
    """1×1 convolution (no bias) → BatchNorm, optionally → ReLU; an ``(N, C)`` embedding is treated as a 1×1 map.

    The convolution is He-normal initialised over its fan-out, BatchNorm to the identity (as the SRD connector of
    Yang et al., ICLR 2021, which is this module with ``relu=True``).
    """

    def __init__(self, in_channels: int, out_channels: int, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        flat = x.dim() == 2
        out = self.bn(self.conv(x[:, :, None, None] if flat else x))
        if self.relu:
            out = torch.relu(out)
        return out.flatten(1) if flat else out


class ConvReg(nn.Module):
    """The convolutional regressor of FitNets as in the CRD benchmark (RepDistiller ``models/util.py``): a
    convolution chosen from the two maps' heights, then BatchNorm and (by default) ReLU.

    * student twice the teacher's height: 3×3 convolution with stride 2;
    * student half the teacher's height: 4×4 transposed convolution with stride 2;
    * student at least as tall: a convolution of kernel ``(1 + H_s − H_t, 1 + W_s − W_t)`` without padding, i.e.
      a 1×1 convolution when the sizes agree;
    * otherwise a ``ValueError`` (the reference does not handle it either): hook another layer.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = True):
        super().__init__()
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(f"ConvReg maps (N, C, H, W) feature maps, got shapes {tuple(student_shape)} and "
                             f"{tuple(teacher_shape)}: use a channel projector ('linear', 'mlp', 'conv_bn')")
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map a {s_h}×{s_w} student map to a {t_h}×{t_w} teacher map (only twice, "
                             "half, or a larger student size): hook layers of closer resolution")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return torch.relu(out) if self.relu else out


class ProjectorEnsemble(nn.Module):
    """The projector ensemble of Chen et al., "Improved Feature Distillation via Projector Ensemble", NeurIPS
    2022: ``mean_k ReLU(W_k x + b_k)`` over ``num_projectors`` independently initialised linear projectors
    (three in the paper's CIFAR-100 setting, official code ``chenyd7/PEFD``)."""

    def __init__(self, in_channels: int, out_channels: int, num_projectors: int = 3):
        super().__init__()
        if num_projectors < 1:
            raise ValueError(f"num_projectors must be at least 1, got {num_projectors}")
        self.projectors = nn.ModuleList(Linear(in_channels, out_channels) for _ in range(num_projectors))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([torch.relu(projector(x)) for projector in self.projectors]).mean(0)


PROJECTORS = ("conv_reg", "conv_bn", "linear", "mlp", "ensemble")


def build_projector(kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The projector ``kind`` (one of :data:`PROJECTORS`) from a student feature of ``student_shape`` to a teacher
    feature of ``teacher_shape`` (both with the batch dimension, as :func:`~lightning_kd.features.feature_shapes`
    gives them)."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}: choose one of {', '.join(PROJECTORS)}")
    if kind == "conv_reg":
        return ConvReg(student_shape, teacher_shape)
    if tuple(student_shape[2:]) != tuple(teacher_shape[2:]):
        raise ValueError(f"the {kind!r} projector keeps the spatial size, but the student feature is "
                         f"{tuple(student_shape[1:])} and the teacher's {tuple(teacher_shape[1:])}: use "
                         "projector='conv_reg' or hook layers of the same resolution")
    in_channels, out_channels = student_shape[1], teacher_shape[1]
    if kind == "conv_bn":
        return ConvBN(in_channels, out_channels)
    if kind == "linear":
        return Linear(in_channels, out_channels)
    if kind == "mlp":
        return MLP(in_channels, out_channels)
    return ProjectorEnsemble(in_channels, out_channels)


__all__ = ["PROJECTORS", "ChannelBatchNorm", "ConvBN", "ConvReg", "Linear", "MLP", "ProjectorEnsemble",
           "build_projector"]
