"""Logit-based distillation losses (functional API).

Every function here takes raw (unnormalised) logits, upcasts them with
``.float()`` and evaluates with autocast disabled, so the result is a float32
tensor for bf16/fp16 inputs and under bf16/fp16 autocast alike. The reductions
follow the official implementations of each paper so that the published
hyper-parameters transfer unchanged; see each docstring.

Dense outputs. :func:`kd_loss`, :func:`dkd_loss`, :func:`dist_loss`,
:func:`normkd_loss` and :func:`standardize_logits` take logits of shape

* ``(B, C)`` -- one prediction per sample (classes on dim 1);
* ``(B, C, H, W)`` -- one prediction per pixel (classes on dim 1, as for
  ``F.cross_entropy`` in segmentation);
* ``(B, T, V)`` -- one prediction per token (classes, the vocabulary, on the
  *last* dim, as language models return them).

The rank decides where the classes are unless the keyword ``class_dim`` says
otherwise: 2-D and 4-D (or more) -> dim 1, 3-D -> the last dim. So a 3-D
``(B, C, L)`` sequence with classes on dim 1 needs ``class_dim=1`` and a
channels-last ``(B, H, W, C)`` map ``class_dim=-1``. Every position (pixel,
token) is one distribution over the classes; the optional keyword ``mask``
(boolean, the logits' shape without the class dim, True = valid) and
``target`` (integer labels of that shape; positions whose label is
``ignore_index``, default -100, are left out) select the positions that
count. The per-position losses are then reduced as a mean over the valid
positions -- their sum divided by the number of valid positions -- which for
``(B, C)`` without mask is the batch mean used before. A batch without any
valid position gives 0 (float32, with zero gradients) rather than an error, so
that a step whose positions are all padding does not stop training. Positions
left out cannot put NaN or inf into the value or the gradient. A per-sample
temperature (``(B,)`` / ``(B, 1)``) applies to every position of its sample.

Implemented:

* :func:`kd_loss` -- Hinton et al., 2015.
* :func:`dkd_loss` -- Decoupled KD, Zhao et al., CVPR 2022.
* :func:`dist_loss` -- DIST, Huang et al., NeurIPS 2022.
* :func:`standardize_logits` -- logit standardization, Sun et al., CVPR 2024.
* :func:`normkd_loss` -- NormKD, Chi et al., 2023.

CTKD's learnable temperature (gradient reversal, the temperature's range and
its cosine curriculum) lives in :mod:`lightning_kd.nn.temperature`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "standardize_logits",
    "normkd_loss",
]

TemperatureLike = Union[float, int, Tensor]

# Offset subtracted from the target-class logit (after temperature scaling) to
# remove it from the non-target softmax, as in the official DKD code.
_DKD_MASK_OFFSET = 1000.0
# Epsilon of the DIST Pearson correlation (added to the product of norms).
_DIST_EPS = 1e-8
# Epsilon of logit standardization (added to the standard deviation).
_STANDARDIZE_EPS = 1e-7


# --------------------------------------------------------------------------- #
# internal utilities
# --------------------------------------------------------------------------- #
def _autocast_off(device: torch.device) -> ContextManager:
    """Context that disables autocast for ``device`` (no-op where unsupported)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return nullcontext()


def _temperature(
    temperature: TemperatureLike, batch_size: int, device: torch.device, per_sample: bool = True
) -> Union[float, Tensor]:
    """Normalise a temperature argument.

    Returns a python float, a 0-d float32 tensor (global, possibly learnable) or
    a ``(B, 1)`` float32 tensor (one temperature per sample).  Gradients flow
    into tensor temperatures.
    """
    if isinstance(temperature, Tensor):
        t = temperature.to(device=device, dtype=torch.float32)
        if t.numel() == 1:
            return t.reshape(())
        if per_sample and t.dim() in (1, 2) and t.shape[0] == batch_size and t.numel() == batch_size:
            return t.reshape(batch_size, 1)
        allowed = "a scalar or a tensor of shape (B,) / (B, 1)" if per_sample else "a scalar"
        raise ValueError(
            f"temperature must be {allowed} (B={batch_size}), got shape {tuple(t.shape)}"
        )
    t = float(temperature)
    if not t > 0.0:
        raise ValueError(f"temperature must be positive, got {t}")
    return t


class _Positions(NamedTuple):
    """Logits flattened to one row per position, ``N = batch_size * per_sample`` rows."""

    student: Tensor  # (N, C) float32
    teacher: Optional[Tensor]  # (N, C) float32, or None when no teacher is given
    valid: Optional[Tensor]  # (N,) bool, True = the position counts; None = every position counts
    target: Optional[Tensor]  # (N,) long, left-out positions set to class 0; None when no target is given
    batch_size: int
    per_sample: int  # positions per sample (1 for (B, C), H * W for pixels, T for tokens)


def _resolve_class_dim(rank: int, class_dim: Optional[int]) -> int:
    """The class dimension: ``class_dim`` if given, else 1 for 2-D and >= 4-D logits, the last dim for 3-D."""
    if class_dim is None:
        return rank - 1 if rank == 3 else 1
    dim = int(class_dim)
    if not -rank <= dim < rank:
        raise ValueError(f"class_dim={class_dim} is out of range for logits with {rank} dimensions")
    dim %= rank
    if dim == 0:
        raise ValueError("class_dim must not be 0: dim 0 is the batch; pass the dimension that holds the classes")
    return dim


def _positions(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    *,
    class_dim: Optional[int],
    mask: Optional[Tensor],
    target: Optional[Tensor],
    ignore_index: int,
) -> _Positions:
    """Check dense logits, move the classes last, flatten the positions and upcast to float32.

    Positions left out by ``mask`` or by ``target == ignore_index`` get the same fixed, finite, non-constant
    row in student and teacher (and class 0 as label), so that every loss stays finite there; the reduction
    (:func:`_mean_over_positions`) then drops them.
    """
    rank = student_logits.dim()
    if rank < 2:
        raise ValueError(
            "expected logits of shape (B, C), (B, C, H, W) or (B, T, V), got student shape "
            f"{tuple(student_logits.shape)}"
        )
    if teacher_logits is not None and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dim = _resolve_class_dim(rank, class_dim)
    num_classes = student_logits.shape[dim]
    positions_shape = student_logits.shape[:dim] + student_logits.shape[dim + 1:]
    batch_size = positions_shape[0]
    per_sample = math.prod(positions_shape[1:])
    device = student_logits.device

    def rows(logits: Tensor) -> Tensor:
        return logits.movedim(dim, -1).reshape(-1, num_classes).float()

    s = rows(student_logits)
    t = None if teacher_logits is None else rows(teacher_logits)

    valid = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a boolean tensor (True = valid position), got dtype {mask.dtype}; pass mask.bool()"
            )
        if mask.shape != positions_shape:
            raise ValueError(
                f"mask must have the shape of the logits without the class dim, {tuple(positions_shape)}, "
                f"got {tuple(mask.shape)}"
            )
        valid = mask.reshape(-1).to(device)
    if target is not None:
        if rank == 2:  # (B,), (B, 1), ... as before
            if target.numel() != batch_size:
                raise ValueError(f"target must hold {batch_size} labels, got {target.numel()}")
        elif target.shape != positions_shape:
            raise ValueError(
                f"target must have the shape of the logits without the class dim, {tuple(positions_shape)}, "
                f"got {tuple(target.shape)}"
            )
        target = target.reshape(-1).to(device=device, dtype=torch.long)
        kept = target != ignore_index
        valid = kept if valid is None else valid & kept
        target = target.masked_fill(~kept, 0)
    if valid is not None:
        fill = torch.arange(num_classes, device=device, dtype=torch.float32) / num_classes
        keep = valid.unsqueeze(1)
        s = torch.where(keep, s, fill)
        t = None if t is None else torch.where(keep, t, fill)
    return _Positions(s, t, valid, target, batch_size, per_sample)


def _position_temperature(
    temperature: TemperatureLike, positions: _Positions, device: torch.device, per_sample: bool = True
) -> Union[float, Tensor]:
    """:func:`_temperature`, with a per-sample temperature repeated for every position of its sample."""
    temp = _temperature(temperature, positions.batch_size, device, per_sample)
    if isinstance(temp, Tensor) and temp.dim() == 2 and positions.per_sample > 1:
        temp = temp.repeat_interleave(positions.per_sample, dim=0)
    return temp


def _mean_over_positions(per_position: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Sum of the per-position losses over the valid positions divided by their number (0 when there is none);
    the plain mean when every position counts."""
    per_position = per_position.reshape(-1)
    if valid is None:
        return per_position.mean()
    total = torch.where(valid, per_position, torch.zeros_like(per_position)).sum()
    return total / valid.sum().clamp(min=1)


def _per_sample_kl(log_p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """``sum_c p_t * (log p_t - log p_s)`` per row, shape ``(B, 1)``.

    ``F.kl_div`` with a probability target uses ``xlogy`` so that classes with
    zero teacher probability contribute exactly 0.
    """
    return F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------- #
# KD
# --------------------------------------------------------------------------- #
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: TemperatureLike = 4.0,
    *,
    class_dim: Optional[int] = None,
    mask: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Vanilla knowledge-distillation loss.

    Paper: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural
    Network", NIPS 2014 Deep Learning Workshop (arXiv:1503.02531, 2015).

    Formula: ``L = mean_i T_i^2 * KL(softmax(t_i / T_i) || softmax(s_i / T_i))``.

    Reduction: the KL divergence is summed over classes, multiplied by ``T^2``
    so that gradient magnitudes do not shrink with the temperature (as in
    mdistiller's ``kd_loss``) and averaged over the valid positions (see the
    module docstring): for ``(B, C)`` the batch mean ("batchmean"), for
    ``(B, C, H, W)`` / ``(B, T, V)`` the mean over the valid pixels / tokens.

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits.
        teacher_logits: teacher logits of the same shape.
        temperature: a positive python number; or a 0-d (or one-element) float
            tensor, e.g. a learnable global temperature (gradients flow into
            it); or a tensor of shape ``(B, 1)`` / ``(B,)`` holding one
            temperature per sample, in which case each sample's KL (at every
            position) is scaled by its own ``T_i^2`` before averaging.
        class_dim: the dimension holding the classes; default 1 for 2-D and
            4-D logits, the last one for 3-D.
        mask: optional boolean tensor of the positions' shape (``(B,)``,
            ``(B, H, W)``, ``(B, T)``), True = the position counts.
        target: optional integer labels of the positions' shape, only used to
            leave out the positions labelled ``ignore_index``.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor (0 when no position is valid).

    Example:
        >>> s = torch.tensor([[0.0, 0.0, 0.0]])
        >>> t = torch.tensor([[0.0, 0.0, math.log(4.0)]])
        >>> round(kd_loss(s, t, temperature=1.0).item(), 4)  # ln(2) / 3
        0.231
        >>> kd_loss(t, t).item()
        0.0
        >>> pixels = s.reshape(1, 3, 1, 1).expand(2, 3, 2, 2)  # 8 pixels with the logits of s
        >>> round(kd_loss(pixels, t.reshape(1, 3, 1, 1).expand(2, 3, 2, 2), temperature=1.0).item(), 4)
        0.231
    """
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, teacher_logits, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        temp = _position_temperature(temperature, pos, pos.student.device)
        log_p_s = F.log_softmax(pos.student / temp, dim=1)
        p_t = F.softmax(pos.teacher / temp, dim=1)
        return _mean_over_positions(_per_sample_kl(log_p_s, p_t) * temp**2, pos.valid)


# --------------------------------------------------------------------------- #
# DKD
# --------------------------------------------------------------------------- #
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: TemperatureLike = 4.0,
    *,
    class_dim: Optional[int] = None,
    mask: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Decoupled knowledge distillation loss (TCKD + NCKD).

    Paper: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge
    Distillation", CVPR 2022.

    Formula: ``L = alpha * T^2 * KL(b_t || b_s) + beta * T^2 * KL(p~_t || p~_s)``
    where ``b = [p_target, 1 - p_target]`` is the binary target/non-target
    distribution of ``softmax(z / T)`` and ``p~`` is the softmax over the
    non-target classes only.

    Reduction (as in the official mdistiller code): each KL is summed over its
    classes and over the valid positions, divided by their number and
    multiplied by ``T^2`` -- for ``(B, C)`` the sum over the batch divided by
    the batch size; for ``(B, C, H, W)`` / ``(B, T, V)`` every pixel / token
    with its own label is one sample (see the module docstring). The non-target
    distribution is obtained, like the official code, by subtracting 1000 from
    the temperature-scaled target logit before the softmax. The binary student
    log-probabilities are computed with ``logsumexp`` instead of ``log`` of
    summed probabilities, which is the same quantity but cannot produce
    ``log(0)``. The linear warm-up of the DKD weight (20 epochs on CIFAR-100)
    is not part of this function.

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits, ``C >= 2``.
        teacher_logits: teacher logits of the same shape.
        target: integer labels, ``(B,)`` (or any ``B`` elements) for ``(B, C)``,
            else the positions' shape (``(B, H, W)``, ``(B, T)``); positions
            labelled ``ignore_index`` are left out.
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: positive number, 0-d tensor or per-sample ``(B, 1)`` tensor
            (see :func:`kd_loss`).
        class_dim: the dimension holding the classes (see :func:`kd_loss`).
        mask: optional boolean tensor of the positions' shape, True = the position counts.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor (0 when no position is valid).

    Example:
        >>> s = torch.zeros(1, 3)
        >>> t = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> y = torch.tensor([0])
        >>> # TCKD = ln(1/2)/6 + 5/6 ln(5/4); NCKD = 2/5 ln(4/5) + 3/5 ln(6/5)
        >>> round(dkd_loss(s, t, y, alpha=1.0, beta=1.0, temperature=1.0).item(), 4)
        0.0906
    """
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, teacher_logits, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        num_classes = pos.student.shape[1]
        if num_classes < 2:
            raise ValueError("dkd_loss needs at least 2 classes")
        temp = _position_temperature(temperature, pos, pos.student.device)
        s = pos.student / temp
        t = pos.teacher / temp
        gt_mask = F.one_hot(pos.target, num_classes).bool()
        idx = pos.target.unsqueeze(1)

        # --- target-class KD: binary distributions [p_gt, p_not_gt] ---------
        def binary_log_probs(z: Tensor) -> Tensor:
            lse_all = torch.logsumexp(z, dim=1, keepdim=True)
            lse_other = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1, keepdim=True)
            return torch.cat([z.gather(1, idx) - lse_all, lse_other - lse_all], dim=1)

        log_b_s = binary_log_probs(s)
        b_t = binary_log_probs(t).exp()
        tckd = _mean_over_positions(_per_sample_kl(log_b_s, b_t) * temp**2, pos.valid)

        # --- non-target-class KD: softmax with the target logit removed ------
        offset = _DKD_MASK_OFFSET * gt_mask.to(s.dtype)
        log_q_s = F.log_softmax(s - offset, dim=1)
        q_t = F.softmax(t - offset, dim=1)
        nckd = _mean_over_positions(_per_sample_kl(log_q_s, q_t) * temp**2, pos.valid)

        return alpha * tckd + beta * nckd


# --------------------------------------------------------------------------- #
# DIST
# --------------------------------------------------------------------------- #
def _pearson_rows(a: Tensor, b: Tensor, eps: float = _DIST_EPS) -> Tensor:
    """Row-wise Pearson correlation, ``cov / (||a - a_mean|| ||b - b_mean|| + eps)``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _pearson_columns(a: Tensor, b: Tensor, valid: Tensor, eps: float = _DIST_EPS) -> Tensor:
    """Column-wise Pearson correlation over the rows where ``valid`` (``(N,)`` bool) holds."""
    weight = valid.unsqueeze(1).to(a.dtype)
    count = weight.sum().clamp(min=1.0)
    a = (a - (a * weight).sum(dim=0, keepdim=True) / count) * weight
    b = (b - (b * weight).sum(dim=0, keepdim=True) / count) * weight
    return (a * b).sum(dim=0) / (a.norm(dim=0) * b.norm(dim=0) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: TemperatureLike = 1.0,
    *,
    class_dim: Optional[int] = None,
    mask: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""DIST: relation (Pearson-correlation) based distillation.

    Paper: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation
    from A Stronger Teacher", NeurIPS 2022.

    Formula: ``L = T^2 * (beta * (1 - mean_i rho(Y_s[i,:], Y_t[i,:]))
    + gamma * (1 - mean_j rho(Y_s[:,j], Y_t[:,j])))`` with ``Y = softmax(Z / T)``.

    Reduction (as in the official code): ``rho`` is the Pearson correlation
    computed as the cosine similarity of mean-centred vectors with ``1e-8``
    added to the product of the norms; the inter-class term averages it over
    the ``B`` samples, the intra-class term over the ``C`` classes (columns of
    the ``B x C`` matrix); both are multiplied by ``T^2``. Only the inter-class
    term is a mean of per-sample terms: the intra-class term correlates each
    class's probabilities *across the batch*, so the loss of a batch is not the
    mean of its samples' losses.

    Dense outputs: like the official segmentation code
    (``segmentation/losses/dist_kd.py`` of ``hunto/DIST_KD``), every valid
    pixel / token is one sample, i.e. the loss equals that of the ``(N, C)``
    matrix of the ``N`` valid positions: the inter-class term is the mean over
    the valid positions, the intra-class term correlates each class over all
    valid positions of the batch (left-out positions take no part in the
    column means and norms). 0 when no position is valid.

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits.
        teacher_logits: teacher logits of the same shape.
        beta: weight of the inter-class relation term.
        gamma: weight of the intra-class relation term.
        temperature: positive number or 0-d tensor (one global temperature).
        class_dim: the dimension holding the classes (see :func:`kd_loss`).
        mask: optional boolean tensor of the positions' shape, True = the position counts.
        target: optional integer labels of the positions' shape, only used to
            leave out the positions labelled ``ignore_index``.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor.

    Example:
        >>> z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
        >>> round(dist_loss(z, z).item(), 4)
        0.0
        >>> p = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]) / 6
        >>> round(dist_loss(p.log(), p.flip(1).log()).item(), 4)  # inter 2 + intra 5/3
        3.6667
    """
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, teacher_logits, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        temp = _position_temperature(temperature, pos, pos.student.device, per_sample=False)
        y_s = F.softmax(pos.student / temp, dim=1)
        y_t = F.softmax(pos.teacher / temp, dim=1)
        if pos.valid is None:
            inter = 1.0 - _pearson_rows(y_s, y_t).mean()
            intra = 1.0 - _pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
        else:
            inter = _mean_over_positions(1.0 - _pearson_rows(y_s, y_t), pos.valid)
            any_valid = pos.valid.any().to(y_s.dtype)
            intra = (1.0 - _pearson_columns(y_s, y_t, pos.valid).mean()) * any_valid
        return temp**2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------- #
# Logit standardization
# --------------------------------------------------------------------------- #
def standardize_logits(logits: Tensor, *, class_dim: Optional[int] = None) -> Tensor:
    r"""Z-score standardization of logits over the class dimension.

    Paper: S. Sun, W. Ren, J. Li, R. Wang, X. Cao, "Logit Standardization in
    Knowledge Distillation", CVPR 2024.

    Formula: ``Z(z) = (z - mean(z)) / (std(z) + 1e-7)`` per sample (per pixel,
    per token), where ``std`` is the unbiased (``C - 1``) standard deviation
    over classes, as in the official code.

    Reduction: none -- the output has the shape of the input; statistics are
    taken over the class dimension, chosen like the losses of this module: dim
    1 for ``(B, C)`` and ``(B, C, H, W)``, the last dim for ``(B, T, V)`` and
    ``(C,)``, or ``class_dim``. (Before dense outputs were supported, 4-D
    inputs were standardized over their last dim; pass ``class_dim=-1`` for
    that.) No mask: each position is standardized on its own, so left-out
    positions do not affect the others. In the paper the standardized logits
    are then divided by a base temperature (2 on CIFAR-100) and fed to the
    usual KD/DKD loss, e.g. ``kd_loss(standardize_logits(s),
    standardize_logits(t), temperature=2.0)``.

    Args:
        logits: ``(C,)``, ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` logits, ``C >= 2``.
        class_dim: the dimension holding the classes (default as above).

    Returns:
        float32 tensor of the same shape.

    Example:
        >>> standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-1.0000,  0.0000,  1.0000]])
    """
    if logits.dim() == 0:
        raise ValueError("standardize_logits needs logits with a class dimension, got a 0-d tensor")
    if logits.dim() == 1:  # a single (C,) vector
        if class_dim not in (None, 0, -1):
            raise ValueError(f"class_dim={class_dim} is out of range for logits with 1 dimension")
        dim = 0
    else:
        dim = _resolve_class_dim(logits.dim(), class_dim)
    with _autocast_off(logits.device):
        z = logits.float()
        mean = z.mean(dim=dim, keepdim=True)
        std = z.std(dim=dim, keepdim=True)
        return (z - mean) / (std + _STANDARDIZE_EPS)


# --------------------------------------------------------------------------- #
# NormKD
# --------------------------------------------------------------------------- #
def normkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature_scale: float = 2.0,
    *,
    class_dim: Optional[int] = None,
    mask: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""NormKD: KD with a per-sample temperature from the logits' spread.

    Paper: Z. Chi, T. Zheng, H. Li, Z. Yang, B. Wu, B. Lin, D. Cai, "NormKD:
    Normalized Logits for Knowledge Distillation", arXiv:2308.00520, 2023.

    Formula: ``L = mean_i Tt_i^2 * KL(softmax(t_i / Tt_i) || softmax(s_i / Ts_i))``
    with ``Tt_i = k * std(t_i)`` and ``Ts_i = k * std(s_i)``.

    Reduction (as in the official code, ``mdistiller/distillers/NormKD.py``):
    each network's logits are divided by *their own* per-sample temperature --
    the teacher by ``k`` times the teacher's standard deviation, the student by
    ``k`` times the student's standard deviation (gradients flow through the
    student's standard deviation); the standard deviation is the unbiased one
    (``C - 1``) over classes; the logits are not mean-centred (softmax is shift
    invariant); the per-sample KL (summed over classes) is multiplied by the
    *teacher's* squared temperature ``Tt_i^2`` and averaged over the valid
    positions (the batch for ``(B, C)``; for ``(B, C, H, W)`` / ``(B, T, V)``
    every pixel / token has its own temperatures, see the module docstring).
    ``k`` (``temperature_scale``, ``T_norm`` in the paper) defaults to 2.0, the
    official CIFAR-100 value (ImageNet configs use 1.0). No epsilon is added:
    a valid position with constant logits has zero standard deviation and gives
    NaN, exactly as in the official implementation (left-out positions never do).

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits, ``C >= 2``.
        teacher_logits: teacher logits of the same shape.
        temperature_scale: the scale ``k`` applied to the standard deviation.
        class_dim: the dimension holding the classes (see :func:`kd_loss`).
        mask: optional boolean tensor of the positions' shape, True = the position counts.
        target: optional integer labels of the positions' shape, only used to
            leave out the positions labelled ``ignore_index``.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor (0 when no position is valid).

    Example:
        >>> t = torch.tensor([[1.0, 2.0, 3.0]])
        >>> round(normkd_loss(2.0 * t, t).item(), 4)  # same after normalisation
        0.0
        >>> round(normkd_loss(t.flip(1), t).item(), 4)  # 4 * (p_t[2] - p_t[0])
        1.2806
    """
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, teacher_logits, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        s, t = pos.student, pos.teacher
        temp_t = temperature_scale * t.std(dim=1, keepdim=True)
        temp_s = temperature_scale * s.std(dim=1, keepdim=True)
        log_p_s = F.log_softmax(s / temp_s, dim=1)
        p_t = F.softmax(t / temp_t, dim=1)
        return _mean_over_positions(_per_sample_kl(log_p_s, p_t) * temp_t**2, pos.valid)
