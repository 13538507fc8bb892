"""ReviewKD's trainable fusion of student stages (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR
2021): attention-based fusion (ABF) modules that run from the deepest student feature to the shallowest, each
fusing its own stage with the fused result of the deeper ones, so that every student level that is compared with a
teacher feature has seen the deeper student levels ("review").

Built from feature shapes (batch dimension first, as :func:`lightning_kd.features.feature_shapes` gives them), so
no channel count is typed; pooled ``(N, C)`` embeddings are treated as ``1×1`` maps.

>>> import torch
>>> fusion = ReviewFusion([(2, 8, 4, 4), (2, 16)], [(2, 12, 4, 4), (2, 24)])
>>> [tuple(f.shape) for f in fusion([torch.zeros(2, 8, 4, 4), torch.zeros(2, 16)])]
[(2, 12, 4, 4), (2, 24, 1, 1)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def as_map(x: Tensor) -> Tensor:
    """An ``(N, C)`` embedding as an ``(N, C, 1, 1)`` map; ``(N, C, H, W)`` maps unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


def _map_shape(shape: Sequence[int], role: str, index: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of a feature shape with batch dimension, ``(C, 1, 1)`` for an embedding."""
    shape = tuple(int(size) for size in shape)
    if len(shape) == 2:
        return shape[1], 1, 1
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    raise ValueError(f"ReviewKD fuses (N, C, H, W) feature maps and (N, C) embeddings, but {role} feature {index} "
                     f"has shape {shape}: hook convolutional stages (student_layers=/teacher_layers=)")


class ABF(nn.Module):
    """Attention-based fusion: a 1×1 conv-BN to ``mid_channels``; with ``fuse``, a weighted sum with the deeper
    fused feature (resized to this level), the two per-position weights coming from a 1×1 conv + sigmoid over both;
    then a resize to the teacher's size and a 3×3 conv-BN to ``out_channels``.

    ``forward(x, residual, out_size)`` returns ``(output, fused)``: ``output`` is compared with the teacher,
    ``fused`` (``mid_channels``, at ``out_size``) goes on to the next, shallower level. Convolutions are
    initialised ``kaiming_uniform_(a=1)`` as in the official code.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                          if fuse else None)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("this ABF fuses with the deeper level: pass its fused feature as residual")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x


class ReviewFusion(nn.Module):
    """One :class:`ABF` per student level, run from the deepest level to the shallowest.

    Level ``i`` maps student feature ``i`` to the channels and size of teacher feature ``i``; every level but the
    deepest fuses with the deeper level's result. The middle width is ``min(max_mid_channels, C)`` with ``C`` the
    deepest student feature's channels (the official code's ``min(512, in_channels[-1])``).

    Args:
        student_shapes: shapes of the student features, shallow to deep, batch dimension first.
        teacher_shapes: shapes of the teacher features they are compared with, in the same order.
        max_mid_channels: upper bound of the fused features' channels.
    """

    def __init__(self, student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]],
                 max_mid_channels: int = 512):
        super().__init__()
        if len(student_shapes) != len(teacher_shapes) or not student_shapes:
            raise ValueError(f"ReviewKD pairs student and teacher features in order, but got {len(student_shapes)} "
                             f"student and {len(teacher_shapes)} teacher features: pass student_layers and "
                             "teacher_layers of equal length")
        student = [_map_shape(shape, "student", i) for i, shape in enumerate(student_shapes)]
        teacher = [_map_shape(shape, "teacher", i) for i, shape in enumerate(teacher_shapes)]
        mid_channels = min(max_mid_channels, student[-1][0])
        deepest = len(student) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid_channels, t[0], fuse=i < deepest)
                                  for i, (s, t) in enumerate(zip(student, teacher)))
        self.out_sizes = [(t[1], t[2]) for t in teacher]

    def forward(self, student_feats: Sequence[Tensor]) -> list[Tensor]:
        """The fused student features, shallow to deep like the input, each shaped as its teacher feature."""
        if len(student_feats) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} student features, got {len(student_feats)}")
        outputs: list[Tensor] = []
        residual = None
        for feat, abf, size in zip(reversed(student_feats), reversed(self.abfs), reversed(self.out_sizes)):
            output, residual = abf(as_map(feat), residual, size)
            outputs.insert(0, output)
        return outputs


__all__ = ["ABF", "ReviewFusion", "as_map"]
