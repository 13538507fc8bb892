"""Losses of the stage-wise feature methods OFD and ReviewKD (functional API).

Each loss takes one student feature and one teacher feature; the method sums it over its pairs of stages. Inputs
are upcast with ``.float()`` and evaluated with autocast disabled, so every result is a 0-d float32 tensor even
under bf16/fp16 autocast. The reductions are those of the official code, so that its loss weights carry over.

* :func:`ofd_loss`, :func:`ofd_margin`, :func:`ofd_margin_from_bn` -- Heo et al., "A Comprehensive Overhaul of
  Feature Distillation", ICCV 2019.
* :func:`hcl_loss` -- Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses.logit import _autocast_off

__all__ = ["hcl_loss", "ofd_loss", "ofd_margin", "ofd_margin_from_bn"]

#: below this probability of a negative response, a channel's margin is ``-3 std`` (as in the official code)
MIN_NEGATIVE_PROBABILITY = 1e-3


# --------------------------------------------------------------------------------------------------------- OFD
def ofd_margin(mean: Tensor, std: Tensor) -> Tensor:
    r"""OFD's margin: the expected value of a Gaussian response given that it is negative, per channel.

    Paper: B. Heo, J. Kim, S. Yun, H. Park, N. Kwak, J. Y. Choi, "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019, eq. (3).

    Formula: ``m = E[x | x < 0] = μ − σ φ(μ/σ) / Φ(−μ/σ)`` for ``x ~ N(μ, σ²)``, with ``φ``/``Φ`` the standard
    normal density/distribution and ``σ = |std|``. Where ``Φ(−μ/σ) ≤ 1e-3`` (hardly any negative response) the
    margin is ``−3σ`` instead, as in the official code (``get_margin_from_BN``); a channel with ``σ = 0`` gets
    ``μ`` when ``μ < 0`` and 0 otherwise.

    Args:
        mean: ``(C,)`` means of the pre-ReLU responses.
        std: ``(C,)`` their standard deviations (the sign is ignored).

    Returns:
        ``(C,)`` float32 margins, all ``≤ 0``, without autograd history.

    Example:
        >>> round(ofd_margin(torch.tensor([0.0]), torch.tensor([1.0])).item(), 4)  # −φ(0) / Φ(0) = −√(2/π)
        -0.7979
    """
    if mean.shape != std.shape or mean.dim() != 1:
        raise ValueError(f"ofd_margin: mean and std must be (C,) vectors of one size, got {tuple(mean.shape)} and "
                         f"{tuple(std.shape)}")
    mean = mean.detach().double()
    std = std.detach().double().abs()
    z = mean / std
    negative_probability = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    conditional = mean - std * density / negative_probability
    margin = torch.where(negative_probability > MIN_NEGATIVE_PROBABILITY, conditional, -3.0 * std)
    return margin.float()


def ofd_margin_from_bn(bn: nn.Module) -> Tensor:
    """:func:`ofd_margin` of the responses of a BatchNorm layer: its output is ``γ · x̂ + β`` with ``x̂`` about
    standard normal, so ``μ = β`` and ``σ = |γ|`` (the official code's ``get_margin_from_BN``). A BatchNorm without
    affine parameters gives ``μ = 0``, ``σ = 1``.

    Example:
        >>> bn = nn.BatchNorm2d(2)
        >>> ofd_margin_from_bn(bn).tolist() == ofd_margin(torch.zeros(2), torch.ones(2)).tolist()
        True
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"ofd_margin_from_bn needs a BatchNorm layer, got {type(bn).__name__}")
    channels = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(channels)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels)
    return ofd_margin(bias.detach().cpu(), weight.detach().cpu()).to(weight.device)


def ofd_loss(student_feat: Tensor, teacher_feat: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's partial L2 distance between the connected student feature and the margin-clipped teacher feature.

    Paper: B. Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019, eqs. (2) and (4).

    Formula: ``L = (1/B) Σ_{b,c,...} 1[s > t' or t' > 0] · (s − t')²`` with ``t' = max(t, m_c)``: the teacher's
    ReLU is replaced by the margin ``m_c ≤ 0`` of its channel (:func:`ofd_margin`), and a position is skipped
    where both the teacher response is non-positive and the student already lies below it.

    Reduction (the official CIFAR-100 code, ``distillation_loss`` summed then divided by the batch size; mdistiller
    ``OFD.py`` takes ``.mean(dim=0).sum()``): sum over channels and positions, mean over the batch. The official
    CIFAR-100 setting divides the loss of stage ``i`` of ``n`` by ``2^(n-i-1)`` and weights the sum by ``1e-3``
    (``loss_distill / batch_size / 1000``); the method does both.

    Args:
        student_feat: ``(B, C, ...)`` student feature after the connector (pre-ReLU space of the teacher).
        teacher_feat: ``(B, C, ...)`` the teacher's pre-ReLU feature, same shape.
        margin: ``(C,)`` per-channel margins.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[0.5, -1.0, 1.0], [-3.0, 2.0, 0.0]])
        >>> t = torch.tensor([[-2.0, -0.2, 3.0], [-1.5, -1.0, -3.0]])
        >>> ofd_loss(s, t, torch.tensor([-1.0, -0.5, -2.0])).item()  # (2.25 + 4 + 6.25 + 4) / 2
        8.25
    """
    if student_feat.shape != teacher_feat.shape or student_feat.dim() < 2:
        raise ValueError(f"ofd_loss: student and teacher features must have one shape (B, C, ...), got "
                         f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}")
    if margin.shape != (student_feat.shape[1],):
        raise ValueError(f"ofd_loss: margin must hold one value per channel ({student_feat.shape[1]}), got shape "
                         f"{tuple(margin.shape)}")
    with _autocast_off(student_feat.device):
        s = student_feat.float()
        margin = margin.float().view(1, -1, *([1] * (s.dim() - 2)))
        t = torch.maximum(teacher_feat.float(), margin)
        mask = (s > t) | (t > 0)
        return ((s - t).pow(2) * mask).sum() / s.shape[0]


# ---------------------------------------------------------------------------------------------------- ReviewKD
def hcl_loss(student_feat: Tensor, teacher_feat: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    r"""ReviewKD's hierarchical context loss: MSE of the maps and of their average-pooled pyramid.

    Paper: P. Chen, S. Liu, H. Zhao, J. Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, sec. 3.3.

    Formula: ``L = (mse(s, t) + Σ_k 2^-k mse(P_k(s), P_k(t))) / (1 + Σ_k 2^-k)`` where ``P_k`` is adaptive average
    pooling to ``l_k × l_k`` for the ``k``-th (``k = 1, 2, …``) of the ``levels`` smaller than the map
    (``l < min(H, W)``); an 8×8 map thus has weights 1, 1/2, 1/4, 1/8 for itself and levels 4, 2, 1, a 1×1 map is
    a plain MSE. As in the official code (``hcl`` in ``CIFAR-100/model/reviewkd.py``), which tests ``l < H`` for
    square maps.

    Reduction: each ``mse`` is the mean over every element (batch, channels, positions). Published weight on
    CIFAR-100: 1 by default (``--kd-loss-weight``), 5 for resnet32x4 → resnet8x4 (``script/reviewKD.sh``), on the
    sum over the fused student levels with a 20-epoch linear warm-up.

    Args:
        student_feat: ``(B, C, H, W)`` fused student feature.
        teacher_feat: ``(B, C, H, W)`` teacher feature of the same shape.
        levels: output sizes of the pyramid, largest first.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])  # one 2×3 map; only level 1 is smaller
        >>> round(hcl_loss(s, torch.zeros_like(s)).item(), 4)  # (91/6 + 3.5² / 2) / 1.5
        14.1944
    """
    if student_feat.shape != teacher_feat.shape or student_feat.dim() != 4:
        raise ValueError(f"hcl_loss: student and teacher features must be (B, C, H, W) maps of one shape, got "
                         f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}")
    with _autocast_off(student_feat.device):
        s, t = student_feat.float(), teacher_feat.float()
        loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= min(s.shape[-2:]):
                continue
            weight /= 2.0
            total += weight
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        return loss / total
