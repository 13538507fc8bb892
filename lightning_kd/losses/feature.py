"""Feature-map distillation losses (functional API).

These losses compare one student feature (map) with one teacher feature
(map) position by position or channel by channel; a method that distils
several layers calls them once per pair of layers and sums the results.
Inputs are upcast with ``.float()`` and evaluated with autocast disabled, so
every result is a 0-d float32 tensor even under bf16/fp16 autocast.  The
reductions follow the reference implementations named in each docstring so
that the published loss weights transfer unchanged.

Implemented:

* :func:`at_loss` -- Attention Transfer, Zagoruyko & Komodakis, ICLR 2017.
* :func:`nst_loss` -- Neuron Selectivity Transfer, Huang & Wang, 2017.
* :func:`fitnet_loss` -- FitNets hints, Romero et al., ICLR 2015.
* :func:`logsum_distance` -- the soft-maximum distance of Miles &
  Mikolajczyk, AAAI 2024.

and the losses of the methods with learnt adapters or a pre-training phase:

* :func:`vid_loss` -- Variational Information Distillation, Ahn et al., CVPR 2019.
* :func:`fsp_matrix`, :func:`fsp_loss` -- Flow of Solution Procedure, Yim et al., CVPR 2017.
* :func:`ab_loss` -- Activation Boundaries, Heo et al., AAAI 2019.
* :func:`ft_loss` -- Factor Transfer, Kim et al., NeurIPS 2018.
* :func:`pool_to_common_size` -- the spatial matching VID, FSP and FT apply
  before comparing maps.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.logit import _autocast_off

__all__ = [
    "at_loss", "nst_loss", "fitnet_loss", "logsum_distance",
    "vid_loss", "fsp_matrix", "fsp_loss", "ab_loss", "ft_loss", "pool_to_common_size",
]


# --------------------------------------------------------------------------- #
# internal utilities
# --------------------------------------------------------------------------- #
def _check_batch(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(f"{name}: inputs need a batch dimension")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student and teacher batch sizes differ "
            f"({student.shape[0]} vs {teacher.shape[0]})"
        )


def _check_maps(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{name}: expected feature maps of shape (B, C, H, W), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    _check_batch(student, teacher, name)


def _pool_to_common_size(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger map(s) to ``(min H, min W)``."""
    height = min(student.shape[-2], teacher.shape[-2])
    width = min(student.shape[-1], teacher.shape[-1])
    if tuple(student.shape[-2:]) != (height, width):
        student = F.adaptive_avg_pool2d(student, (height, width))
    if tuple(teacher.shape[-2:]) != (height, width):
        teacher = F.adaptive_avg_pool2d(teacher, (height, width))
    return student, teacher


def _check_same_shape(student: Tensor, teacher: Tensor, name: str, fix: str) -> None:
    _check_batch(student, teacher, name)
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher tensors must have the same shape ({fix}), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def pool_to_common_size(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Both ``(B, C, H, W)`` maps at ``(min H, min W)``: the larger one adaptive-average-pooled, as RepDistiller's
    VID, FSP and FT modules do (they compare heights and pool to a square, identical for square maps)."""
    _check_maps(student_feat, teacher_feat, "pool_to_common_size")
    return _pool_to_common_size(student_feat, teacher_feat)


# --------------------------------------------------------------------------- #
# Attention Transfer
# --------------------------------------------------------------------------- #
def _attention_map(feat: Tensor, p: float) -> Tensor:
    """``normalize(mean_c |f_c|^p)`` flattened to ``(B, H*W)``."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention Transfer (activation-based attention maps).

    Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention:
    Improving the Performance of Convolutional Neural Networks via Attention
    Transfer", ICLR 2017.

    Formula: ``L = mean_{b, j} (Q_s[b, j] - Q_t[b, j])^2`` with
    ``Q[b] = a[b] / ||a[b]||_2`` and ``a[b, j] = mean_c |f[b, c, j]|^p`` over the
    flattened spatial positions ``j``.

    Reduction (as in RepDistiller ``distiller_zoo/AT.py`` and the authors'
    code): the squared difference of the normalised maps is averaged over the
    batch *and* the ``H*W`` positions.  Channel counts may differ.  When the
    spatial sizes differ, the larger map is adaptive-average-pooled to the
    smaller size first (RepDistiller compares heights only and pools to a
    square; for square maps this is identical).  The reference raises ``f``
    to the power ``p`` without the absolute value; for the default ``p = 2``
    the two coincide.  Published weight: 1000 (CRD benchmark, CIFAR-100),
    applied to the sum of this loss over the outputs of every stage between
    the stem and the global pooling (``feat[1:-1]`` in RepDistiller, e.g. the
    three residual stages of a CIFAR ResNet).

    Args:
        student_feat: ``(B, C_s, H_s, W_s)`` student feature map.
        teacher_feat: ``(B, C_t, H_t, W_t)`` teacher feature map.
        p: exponent of the attention map.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # Q_s = (1, 0)
        >>> t = torch.ones(1, 2, 1, 2)  # Q_t = (1, 1) / sqrt(2)
        >>> round(at_loss(s, t).item(), 4)  # ((1 - 1/sqrt2)^2 + 1/2) / 2
        0.2929
    """
    _check_maps(student_feat, teacher_feat, "at_loss")
    with _autocast_off(student_feat.device):
        s, t = _pool_to_common_size(student_feat.float(), teacher_feat.float())
        return (_attention_map(s, p) - _attention_map(t, p)).pow(2).mean()


# --------------------------------------------------------------------------- #
# Neuron Selectivity Transfer
# --------------------------------------------------------------------------- #
def _mean_poly2_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{n, i, j} (a[n, i] . b[n, j])^2`` for ``(B, C_a, N)``, ``(B, C_b, N)``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Neuron Selectivity Transfer: MMD between channel activation patterns.

    Paper: Z. Huang, N. Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv:1707.01219, 2017.

    Formula: ``L = mean_b [ mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j')
    - 2 mean_{i,j} k(s_j, t_i) ]`` with the polynomial kernel
    ``k(x, y) = (x . y)^2`` (``d = 2, c = 0``), where ``s_j`` / ``t_i`` is channel
    ``j`` / ``i`` of one sample, flattened over the ``H*W`` positions and
    L2-normalised over them.

    Reduction (as in RepDistiller ``distiller_zoo/NST.py``, ``full_loss``):
    each kernel term is averaged over the batch and over all channel pairs
    (``C_s * C_s``, ``C_t * C_t``, ``C_s * C_t``; channel counts may differ);
    the teacher-teacher term is detached, so it adds its value but no
    gradient.  Spatial sizes are matched first by adaptive average pooling of
    the larger map, as for :func:`at_loss`.  Published weight: 50 (CRD
    benchmark, CIFAR-100), applied to the sum over the same stages as AT
    (``feat[1:-1]``).

    Args:
        student_feat: ``(B, C_s, H_s, W_s)`` student feature map.
        teacher_feat: ``(B, C_t, H_t, W_t)`` teacher feature map.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[[[3.0, 0.0]], [[0.0, 2.0]]]])  # channels e1, e2
        >>> t = torch.tensor([[[[5.0, 0.0]], [[0.5, 0.0]]]])  # channels e1, e1
        >>> nst_loss(s, t).item()  # 1 + 1/2 - 2 * 1/2
        0.5
    """
    _check_maps(student_feat, teacher_feat, "nst_loss")
    with _autocast_off(student_feat.device):
        s, t = _pool_to_common_size(student_feat.float(), teacher_feat.float())
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
        return (
            _mean_poly2_kernel(t, t).detach()
            + _mean_poly2_kernel(s, s)
            - 2.0 * _mean_poly2_kernel(s, t)
        )


# --------------------------------------------------------------------------- #
# FitNets
# --------------------------------------------------------------------------- #
def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""FitNets hint loss: mean squared error to the teacher's hint.

    Paper: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta,
    Y. Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    Formula: ``L = mean (r(f_s) - f_t)^2`` where ``r`` is the trainable
    regressor that the caller has already applied to the student feature.

    Reduction: mean over every element (``F.mse_loss`` with ``'mean'``, as in
    RepDistiller ``distiller_zoo/FitNet.py`` and mdistiller ``FitNet.py``).
    The shapes must match exactly (no broadcasting).  Published weight: 100
    (CRD benchmark, CIFAR-100), on the output of the second stage
    (``hint_layer = 2``) after a conv-BN-ReLU regressor.

    Args:
        student_feat: regressed student feature, any shape ``(B, ...)``.
        teacher_feat: teacher feature of the same shape.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> round(fitnet_loss(s, torch.zeros(2, 3)).item(), 4)  # 91 / 6
        15.1667
    """
    _check_batch(student_feat, teacher_feat, "fitnet_loss")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            "fitnet_loss: student and teacher features must have the same shape "
            f"(regress the student first), got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}"
        )
    with _autocast_off(student_feat.device):
        return F.mse_loss(student_feat.float(), teacher_feat.float())


# --------------------------------------------------------------------------- #
# LogSum (soft maximum) distance
# --------------------------------------------------------------------------- #
def logsum_distance(
    student_feat: Tensor, teacher_feat: Tensor, alpha: float = 4.0, eps: float = 0.0
) -> Tensor:
    r"""Soft-maximum ("LogSum") distance between projected, normalised features.

    Paper: R. Miles, K. Mikolajczyk, "Understanding the Role of the Projector
    in Knowledge Distillation", AAAI 2024 (arXiv:2303.11098).

    Formula: ``L = log( sum_{b, d} |z_s[b, d] - z_t[b, d]|^alpha + eps )``.

    Reduction (as in the official code,
    ``imagenet/torchdistill/losses/single.py`` of
    roymiles/Simple-Recipe-Distillation, and torchdistill's ``SRDLoss``): the
    powered absolute differences are *summed* over the batch and all feature
    dimensions (no mean) and the log is taken of that sum; for large ``alpha``
    it approaches ``alpha * log max |z_s - z_t|``.  ``alpha = 4`` is the
    official exponent.  The method expects ``z_s`` to be the student's pooled
    feature after the linear projector and ``z_t`` the teacher's pooled
    feature, both batch-normalised without affine parameters (batch
    statistics; BN eps ``1e-4`` in the ImageNet code); that projection and
    normalisation are not part of this function.  The official ResNet code
    adds no epsilon (``eps = 0``), so identical inputs give ``-inf``; the DeiT
    code adds ``1e-5`` inside the log.  Published weight: 2.0 (ResNet-34 to
    ResNet-18 on ImageNet, next to a KD term with ``T = 1``); the DeiT
    experiments use 1.0.

    Args:
        student_feat: ``(B, ...)`` projected, normalised student feature.
        teacher_feat: teacher feature of the same shape.
        alpha: exponent of the absolute differences.
        eps: added to the sum before the log.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
        >>> round(logsum_distance(s, torch.zeros(2, 3)).item(), 4)  # ln(1 + 1 + 16)
        2.8904
    """
    _check_batch(student_feat, teacher_feat, "logsum_distance")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            "logsum_distance: student and teacher features must have the same shape "
            f"(project the student first), got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}"
        )
    with _autocast_off(student_feat.device):
        diff = (student_feat.float() - teacher_feat.float()).abs()
        return torch.log(diff.pow(alpha).sum() + eps)


# --------------------------------------------------------------------------------------------------------- VID
def vid_loss(predicted_mean: Tensor, teacher_feat: Tensor, variance: Tensor) -> Tensor:
    r"""Variational information distillation: the negative log-likelihood of the teacher's feature under a
    Gaussian whose mean the student predicts and whose per-channel variance is learnt.

    Paper: S. Ahn, S. X. Hu, A. Damianou, N. D. Lawrence, Z. Dai, "Variational Information Distillation for
    Knowledge Transfer", CVPR 2019.

    Formula: ``L = mean_{b, c, ...} 0.5 · (log σ_c² + (t_{b,c,...} − μ_{b,c,...})² / σ_c²)`` (the constant
    ``log 2π`` dropped), ``μ`` the regressed student feature, ``σ_c²`` the heteroscedastic variance of channel
    ``c`` (in the method: ``softplus(α_c) + ε``, ``ε = 1e-5``).

    Reduction (as RepDistiller ``distiller_zoo/VID.py``, from the authors' code): the mean over every element of
    the feature map, batch included. Published weight: 1 (CRD benchmark, CIFAR-100, ``--distill vid -b 1``),
    applied to the sum over the stage outputs between the stem and the global pooling.

    Args:
        predicted_mean: ``(B, C, ...)`` regressed student feature, of the teacher feature's shape.
        teacher_feat: ``(B, C, ...)`` teacher feature.
        variance: ``(C,)`` positive variances, one per channel (dimension 1).

    Returns:
        0-d float32 tensor.

    Example:
        >>> mean, target = torch.zeros(1, 2), torch.tensor([[1.0, 2.0]])
        >>> round(vid_loss(mean, target, torch.tensor([1.0, 4.0])).item(), 4)  # (0.5 + 0.5 (log 4 + 1)) / 2
        0.8466
    """
    _check_same_shape(predicted_mean, teacher_feat, "vid_loss", "regress the student to the teacher's shape")
    if predicted_mean.dim() < 2 or variance.shape != (predicted_mean.shape[1],):
        raise ValueError(f"vid_loss: variance must hold one value per channel (shape ({predicted_mean.shape[1]},) "
                         f"for features of shape {tuple(predicted_mean.shape)}), got {tuple(variance.shape)}")
    with _autocast_off(predicted_mean.device):
        var = variance.float().view(1, -1, *([1] * (predicted_mean.dim() - 2)))
        squared_error = (teacher_feat.float() - predicted_mean.float()).pow(2)
        return (0.5 * (squared_error / var + var.log())).mean()


# --------------------------------------------------------------------------------------------------------- FSP
def fsp_matrix(bottom_feat: Tensor, top_feat: Tensor) -> Tensor:
    r"""The FSP ("flow of solution procedure") matrix of two layers of one model.

    Paper: J. Yim, D. Joo, J. Bae, J. Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017.

    Formula: ``G[b, i, j] = mean_{h, w} F1[b, i, h, w] · F2[b, j, h, w]`` (the paper's sum over positions
    divided by ``h · w``), ``F1`` the lower layer, ``F2`` the upper one.

    As RepDistiller ``distiller_zoo/FSP.py``: when the two maps differ in size, the larger is adaptive-average-
    pooled to the smaller first (the paper pairs layers of equal size).

    Args:
        bottom_feat: ``(B, C1, H1, W1)`` lower feature map.
        top_feat: ``(B, C2, H2, W2)`` upper feature map of the same model.

    Returns:
        ``(B, C1, C2)`` float32 tensor.

    Example:
        >>> bottom = torch.tensor([[[[1.0, 3.0]]]])  # one channel, two positions
        >>> top = torch.tensor([[[[2.0, 0.0]], [[1.0, 1.0]]]])
        >>> fsp_matrix(bottom, top).tolist()  # [(1·2 + 3·0) / 2, (1·1 + 3·1) / 2]
        [[[1.0, 2.0]]]
    """
    _check_maps(bottom_feat, top_feat, "fsp_matrix")
    with _autocast_off(bottom_feat.device):
        bottom, top = _pool_to_common_size(bottom_feat.float(), top_feat.float())
        return torch.bmm(bottom.flatten(2), top.flatten(2).transpose(1, 2)) / bottom[0, 0].numel()


def fsp_loss(student_fsp: Tensor, teacher_fsp: Tensor) -> Tensor:
    r"""FSP loss: squared distance between a student's and the teacher's FSP matrices (:func:`fsp_matrix`).

    Paper: J. Yim et al., "A Gift from Knowledge Distillation", CVPR 2017.

    Formula: ``L = mean_{b, i, j} (G_s[b, i, j] − G_t[b, i, j])²``.

    Reduction (as RepDistiller ``distiller_zoo/FSP.py``): the mean over the batch and both channel dimensions
    (the paper's ``1/N Σ ||G_t − G_s||²`` up to the constant ``C1 · C2``). The matrices must have the same shape,
    i.e. student and teacher layers of equal channel counts (the method connects the student's otherwise). As in
    the reference and the paper, the loss is used in a pre-training phase only (weight 1 on the sum over the
    consecutive stage pairs, stem included); the CRD benchmark's ``-b 50`` has no effect there.

    Args:
        student_fsp: ``(B, C1, C2)`` student FSP matrix.
        teacher_fsp: ``(B, C1, C2)`` teacher FSP matrix.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> fsp_loss(s, torch.zeros(1, 2, 2)).item()  # (1 + 4 + 9 + 16) / 4
        7.5
    """
    _check_same_shape(student_fsp, teacher_fsp, "fsp_loss", "FSP matrices of layers with the same channel counts")
    with _autocast_off(student_fsp.device):
        return (student_fsp.float() - teacher_fsp.float()).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------- AB
def ab_loss(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary loss: the hinge ("alternative") loss that makes each connected student neuron active
    where the teacher's is, by a margin.

    Paper: B. Heo, M. Lee, S. Yun, J. Y. Choi, "Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons", AAAI 2019 (eq. 5).

    Formula: ``L = 1/B Σ_{b, c, h, w} [ (s + μ)² · 1(s > −μ, t ≤ 0) + (s − μ)² · 1(s ≤ μ, t > 0) ]`` with ``s``
    the connected student pre-activation, ``t`` the teacher's pre-activation and ``μ`` the margin.

    Reduction (as RepDistiller ``distiller_zoo/AB.py`` ``criterion_alternative_l2``, from the authors' code): the
    sum over all elements divided by the batch size. The reference then weights stage ``l`` of ``L`` by
    ``2^(l − L + 1)`` and scales the sum by ``3/1000`` (the method's ``ab_weight``); margin 1.

    Args:
        student_preact: ``(B, ...)`` student pre-activation after the connector.
        teacher_preact: teacher pre-activation of the same shape.
        margin: ``μ``.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[0.5, -2.0, 0.5, 2.0]])
        >>> t = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
        >>> ab_loss(s, t).item()  # (0.5 + 1)² + 0 + (0.5 − 1)² + 0
        2.5
    """
    _check_same_shape(student_preact, teacher_preact, "ab_loss", "connect the student to the teacher's shape")
    with _autocast_off(student_preact.device):
        s, t = student_preact.float(), teacher_preact.float()
        teacher_active = t > 0
        push_down = (s > -margin) & ~teacher_active
        push_up = (s <= margin) & teacher_active
        loss = (s + margin).pow(2) * push_down + (s - margin).pow(2) * push_up
        return loss.sum() / s.shape[0]


# ---------------------------------------------------------------------------------------------------------- FT
def _factor_map(factor: Tensor, exponent: float | None) -> Tensor:
    if exponent is None:
        return F.normalize(factor.flatten(1), dim=1)
    return F.normalize(factor.abs().pow(exponent).mean(dim=1).flatten(1), dim=1)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0, exponent: float | None = 2.0) -> Tensor:
    r"""Factor-transfer loss between the student's translated factor and the teacher's paraphrased factor.

    Paper: J. Kim, S. Park, N. Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018 (eq. 3).

    Formula: ``L = mean_{b, j} |Q_s[b, j] − Q_t[b, j]|^p`` with ``Q = normalize(mean_c |F_c|^exponent)`` over the
    flattened positions ``j`` (``exponent = 2``, RepDistiller's ``p1``), or, with ``exponent=None``,
    ``Q = F / ||F||_2`` over all of ``C·H·W`` (the paper's ``F_T/||F_T||_2 − F_S/||F_S||_2``).

    Reduction (as RepDistiller ``distiller_zoo/FT.py``, whose CIFAR-100 numbers the published weight 200 comes
    from, ``--distill factor -b 200``): the mean over the batch and the positions (or the ``C·H·W`` entries), ``p =
    1``. Maps of different size are matched by pooling the larger one first (:func:`pool_to_common_size`).

    Args:
        student_factor: ``(B, C, H_s, W_s)`` translated student factor.
        teacher_factor: ``(B, C', H_t, W_t)`` paraphrased teacher factor (``C' = C`` when ``exponent=None``).
        p: exponent of the absolute differences (1: the paper's L1).
        exponent: power of the factor before the channel mean, or ``None`` for the whole normalised factor.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # Q_s = (1, 0)
        >>> t = torch.ones(1, 2, 1, 2)  # Q_t = (1, 1) / sqrt(2)
        >>> round(ft_loss(s, t).item(), 4)  # (|1 − 1/sqrt2| + 1/sqrt2) / 2
        0.5
    """
    _check_maps(student_factor, teacher_factor, "ft_loss")
    if exponent is None and student_factor.shape[1] != teacher_factor.shape[1]:
        raise ValueError(f"ft_loss: with exponent=None the factors must have the same channels, got "
                         f"{student_factor.shape[1]} and {teacher_factor.shape[1]}")
    with _autocast_off(student_factor.device):
        s, t = _pool_to_common_size(student_factor.float(), teacher_factor.float())
        return (_factor_map(s, exponent) - _factor_map(t, exponent)).abs().pow(p).mean()
