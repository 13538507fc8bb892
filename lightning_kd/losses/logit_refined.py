"""Logit losses that refine what the student matches (functional API): RLD's label-refined teacher, Tf-KD's
virtual teacher, MLKD's multi-level alignment.

Same conventions as :mod:`lightning_kd.losses.logit`: every function takes raw
logits, upcasts them with ``.float()`` and evaluates with autocast disabled, so
the result is a float32 tensor for bf16/fp16 inputs and under bf16/fp16
autocast too. The reductions follow each paper's official code so that the
published hyper-parameters transfer unchanged; see each docstring.

Dense outputs: :func:`rld_loss` and :func:`virtual_teacher_loss` are means of
per-sample terms and take ``(B, C)``, ``(B, C, H, W)`` (per pixel) or
``(B, T, V)`` (per token) logits with ``class_dim``, ``mask`` and
``ignore_index`` exactly as :func:`lightning_kd.losses.logit.kd_loss` (mean over
the valid positions, 0 when there is none). :func:`mlkd_loss` takes ``(B, C)``
only: its batch- and class-level terms compare ``B x B`` and ``C x C``
correlation matrices and its masks are medians over the batch, so it is not a
mean over positions, and treating every pixel as a sample would need an
``N x N`` matrix over all pixels of the batch.

Implemented:

* :func:`rld_loss` -- Refined Logit Distillation, Sun et al., 2024.
* :func:`mlkd_loss` -- Multi-Level Logit Distillation, Jin et al., CVPR 2023.
* :func:`virtual_teacher_probs`, :func:`virtual_teacher_loss` -- the
  hand-designed teacher of Teacher-free KD, Yuan et al., CVPR 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.logit import (
    TemperatureLike,
    _autocast_off,
    _mean_over_positions,
    _per_sample_kl,
    _position_temperature,
    _positions,
)

__all__ = ["rld_loss", "mlkd_loss", "virtual_teacher_probs", "virtual_teacher_loss"]

# Value written over the temperature-scaled logits of the classes that RLD's
# masked correlation distillation leaves out (finite, as in the official code,
# so that a row with every class masked gives two uniform distributions and a
# zero loss instead of NaN).
_RLD_MASK_FILL = -1e9


def _binary_log_probs(z: Tensor, index: Tensor) -> Tensor:
    """``log [p_k, 1 - p_k]`` of ``softmax(z)`` for the class ``k = index`` of each row, shape ``(B, 2)``."""
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    lse_rest = torch.logsumexp(z.scatter(1, index, float("-inf")), dim=1, keepdim=True)
    return torch.cat([z.gather(1, index) - lse_all, lse_rest - lse_all], dim=1)


# --------------------------------------------------------------------------- #
# RLD
# --------------------------------------------------------------------------- #
def rld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: TemperatureLike = 4.0,
    confidence_temperature: TemperatureLike | None = None,
    *,
    class_dim: int | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Refined logit distillation: sample confidence + masked correlation distillation.

    Paper: W. Sun, D. Chen, S. Lyu, G. Chen, C. Chen, C. Wang, "Knowledge
    Distillation with Refined Logits", arXiv:2408.07703, 2024.

    Formula: ``L = alpha * Tc^2 * KL([q_t, 1 - q_t] || [p_s(y), 1 - p_s(y)])
    + beta * T^2 * KL(softmax(t / T)|_M || softmax(s / T)|_M)``, where ``p = softmax(z / Tc)``,
    ``q_t = max_k p_t(k)`` is the teacher's top-1 confidence (whatever class it
    predicts), ``y`` the label, and ``M`` the classes whose teacher logit is
    *below* the teacher's logit of ``y`` (the label and every class the teacher
    ranks at or above it are removed, so a wrong teacher prediction does not
    pull the student towards the wrong class).

    Reduction (as in the official code, ``mdistiller/distillers/RLD.py`` of
    ``zju-SWJ/RLD``): each KL is summed over its classes and averaged over the
    batch ("batchmean") and multiplied by the square of its temperature. The
    removed classes are filled with ``-1e9`` after the temperature scaling, like
    the official code: a sample whose label has the teacher's lowest logit keeps
    no class and contributes 0. The binary log-probabilities are computed with
    ``logsumexp`` (same quantity as the official ``log`` of summed
    probabilities, without ``log(0)``). For ``(B, C, H, W)`` / ``(B, T, V)``
    logits every valid pixel / token with its own label is one sample and
    "batch" above reads "valid positions" (see the module docstring); 0 when
    no position is valid. The official CIFAR-100 setting is
    ``alpha = 1, beta = 8, T = 4`` with the same temperature for both terms
    (the ``--same-t`` flag of its README); the linear warm-up of the loss over
    20 epochs is not part of this function.

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits, ``C >= 2``.
        teacher_logits: teacher logits of the same shape.
        target: integer labels, ``(B,)`` for ``(B, C)``, else the positions'
            shape (``(B, H, W)``, ``(B, T)``); positions labelled
            ``ignore_index`` are left out.
        alpha: weight of sample confidence distillation.
        beta: weight of masked correlation distillation.
        temperature: temperature ``T`` of the masked correlation term: a
            positive number, a 0-d tensor or a per-sample ``(B, 1)`` tensor.
        confidence_temperature: temperature ``Tc`` of the sample confidence term;
            ``None`` (default) uses ``temperature``.
        class_dim: the dimension holding the classes; default 1 for 2-D and
            4-D logits, the last one for 3-D.
        mask: optional boolean tensor of the positions' shape, True = the position counts.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.zeros(1, 3)
        >>> t = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> y = torch.tensor([1])  # the teacher predicts class 2 with 1/2; class 0 is kept
        >>> # SCD = 1/2 ln(3/2) + 1/2 ln(3/4); MCD = 0 (one class left on both sides)
        >>> round(rld_loss(s, t, y, alpha=1.0, beta=1.0, temperature=1.0).item(), 4)
        0.0589
    """
    if confidence_temperature is None:
        confidence_temperature = temperature
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, teacher_logits, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        if pos.student.shape[1] < 2:
            raise ValueError("rld_loss needs at least 2 classes")
        s, t = pos.student, pos.teacher
        temp = _position_temperature(temperature, pos, s.device)
        temp_c = _position_temperature(confidence_temperature, pos, s.device)
        label = pos.target.unsqueeze(1)

        log_b_s = _binary_log_probs(s / temp_c, label)
        b_t = _binary_log_probs(t / temp_c, t.argmax(dim=1, keepdim=True)).exp()
        scd = _mean_over_positions(_per_sample_kl(log_b_s, b_t) * temp_c**2, pos.valid)

        removed = t >= t.gather(1, label)
        log_q_s = F.log_softmax((s / temp).masked_fill(removed, _RLD_MASK_FILL), dim=1)
        q_t = F.softmax((t / temp).masked_fill(removed, _RLD_MASK_FILL), dim=1)
        mcd = _mean_over_positions(_per_sample_kl(log_q_s, q_t) * temp**2, pos.valid)

        return alpha * scd + beta * mcd


# --------------------------------------------------------------------------- #
# MLKD
# --------------------------------------------------------------------------- #
def _fraction_at_most_median(values: Tensor) -> Tensor:
    """Fraction of ``values`` that are ``<=`` their median (linear-interpolated 50th percentile)."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


def mlkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
    instance_weight: float = 1.0,
    batch_weight: float = 1.0,
    class_weight: float = 1.0,
) -> Tensor:
    r"""Multi-level logit distillation on one view: instance, batch and class alignment over several temperatures.

    Paper: Y. Jin, J. Wang, D. Lin, "Multi-Level Logit Distillation", CVPR 2023.

    Formula: with ``P_T = softmax(Z / T)`` (``B x C``),
    ``L = sum_T [ f_B * (w_i * T^2 * mean_n KL(P_T^t[n] || P_T^s[n])
    + w_b * ||P_T^t P_T^t' - P_T^s P_T^s'||_F^2 / B)
    + f_C * w_c * ||P_T^t' P_T^t - P_T^s' P_T^s||_F^2 / C ]``:
    instance-level KD, batch-level alignment of the ``B x B`` sample-correlation
    (Gram) matrices and class-level alignment of the ``C x C`` class-correlation
    matrices, summed over the temperatures ("prediction augmentation").

    Confidence masking and reduction (as in the official code,
    ``mdistiller/distillers/KD_ours.py`` of ``Jin-Ying/Multi-Level-Logit-Distillation``):
    the sample mask keeps the samples whose teacher top-1 confidence (softmax at
    temperature 1) is at most the batch median; the class mask keeps the classes
    whose teacher probability summed over the batch is at most the median over
    classes. The official code multiplies each *already batch-reduced* loss by
    its mask and averages, so a mask acts only through the fraction it keeps:
    ``f_B`` (about 1/2) scales the instance and batch terms and ``f_C`` (about
    1/2) the class term; this function reproduces exactly that. The instance KL
    is summed over classes, averaged over the batch and multiplied by ``T^2``;
    the correlation terms have no ``T^2``. The official temperatures are
    2, 3, 4, 5 and 6, all weighted alike.

    Views: the official code trains on a weak and a strong (RandAugment)
    augmentation of each batch; this function is the loss on *one* view pair,
    i.e. the weak-view loss of the official code and the whole loss of the
    single-view variant the RLD authors compare with (``MLKD_NOAUG`` in
    ``zju-SWJ/RLD``). The official strong view adds only an unmasked instance
    KD, ``sum_T T^2 * mean_n KL`` (its code takes the ``T = 2`` and ``T = 6``
    terms from the weak view), i.e. this function with ``batch_weight =
    class_weight = 0`` without the mask fraction.

    Dense outputs (``(B, C, H, W)``, ``(B, T, V)``) are not accepted: the
    batch- and class-level terms and both masks are statistics of the whole
    batch, not means over positions (see the module docstring).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        temperatures: the temperatures ``T`` to sum over (positive numbers).
        instance_weight: weight ``w_i`` of the instance-level term.
        batch_weight: weight ``w_b`` of the batch-level term.
        class_weight: weight ``w_c`` of the class-level term.

    Returns:
        0-d float32 tensor.

    Example:
        >>> z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
        >>> round(mlkd_loss(z, z).item(), 4)
        0.0
        >>> s, t = torch.zeros(2, 2), torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
        >>> # T = 1, f_B = f_C = 1/2: instance (1/4 ln(1/2) + 3/4 ln(3/2)) / 2, batch (1/8)^2 / 2,
        >>> # class (9 + 1 + 1 + 25) / 256 / 2
        >>> round(mlkd_loss(s, t, temperatures=(1.0,)).item(), 4)
        0.0718
    """
    if student_logits.dim() != 2:
        raise ValueError(
            f"mlkd_loss takes (B, C) logits only, got shape {tuple(student_logits.shape)}: its batch- and "
            "class-level terms are statistics of the whole batch; reshape the positions into (N, C) yourself "
            "if every position is meant to be one sample"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    temperatures = [float(temperature) for temperature in temperatures]
    if not temperatures or min(temperatures) <= 0.0:
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temperatures}")
    batch_size, num_classes = student_logits.shape
    with _autocast_off(student_logits.device):
        s = student_logits.float()
        t = teacher_logits.float()
        teacher_probs = F.softmax(t.detach(), dim=1)
        sample_fraction = _fraction_at_most_median(teacher_probs.max(dim=1).values)
        class_fraction = _fraction_at_most_median(teacher_probs.sum(dim=0))

        instance = s.new_zeros(())
        batch = s.new_zeros(())
        klass = s.new_zeros(())
        for temperature in temperatures:
            log_p_s = F.log_softmax(s / temperature, dim=1)
            p_s = log_p_s.exp()
            p_t = F.softmax(t / temperature, dim=1)
            instance = instance + _per_sample_kl(log_p_s, p_t).mean() * temperature**2
            batch = batch + (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / batch_size
            klass = klass + (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / num_classes

        return (sample_fraction * (instance_weight * instance + batch_weight * batch)
                + class_fraction * class_weight * klass)


# --------------------------------------------------------------------------- #
# Teacher-free KD: the hand-designed ("virtual") teacher
# --------------------------------------------------------------------------- #
def virtual_teacher_probs(target: Tensor, num_classes: int, correct_prob: float = 0.99) -> Tensor:
    r"""The hand-designed teacher distribution of Teacher-free KD (Tf-KD\ :sub:`reg`).

    Paper: L. Yuan, F. E. H. Tay, G. Li, T. Wang, J. Feng, "Revisiting Knowledge
    Distillation via Label Smoothing Regularization", CVPR 2020.

    Formula: ``p_d(k) = a`` for the label ``k = y`` and ``(1 - a) / (K - 1)``
    for every other class.

    Reduction: none -- one row per label. The paper asks for ``a >= 0.9`` so
    that this teacher is always right; the official code uses ``a = 0.99``.

    Args:
        target: ``(B,)`` integer class labels.
        num_classes: number of classes ``K >= 2``.
        correct_prob: probability ``a`` of the labelled class, in ``[0, 1]``.

    Returns:
        ``(B, K)`` float32 tensor whose rows sum to 1.

    Example:
        >>> virtual_teacher_probs(torch.tensor([1]), 3, correct_prob=0.9)
        tensor([[0.0500, 0.9000, 0.0500]])
    """
    if num_classes < 2:
        raise ValueError("the virtual teacher needs at least 2 classes")
    if not 0.0 <= correct_prob <= 1.0:
        raise ValueError(f"correct_prob must lie in [0, 1], got {correct_prob}")
    target = target.reshape(-1).long()
    probs = torch.full((target.numel(), num_classes), (1.0 - correct_prob) / (num_classes - 1),
                       dtype=torch.float32, device=target.device)
    return probs.scatter_(1, target.unsqueeze(1), correct_prob)


def virtual_teacher_loss(
    student_logits: Tensor,
    target: Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    *,
    class_dim: int | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""KL divergence from the softened hand-designed teacher of Tf-KD\ :sub:`reg` to the student.

    Paper: L. Yuan, F. E. H. Tay, G. Li, T. Wang, J. Feng, "Revisiting Knowledge
    Distillation via Label Smoothing Regularization", CVPR 2020.

    Formula: ``L = mean_i KL(softmax(p_d[i] / T) || softmax(s_i))`` with ``p_d``
    from :func:`virtual_teacher_probs`.

    Reduction and softening as in the official code (``loss_kd_regularization``
    in ``my_loss_function.py`` of ``yuanli2333/Teacher-free-Knowledge-Distillation``):
    the temperature softens the teacher by treating its *probabilities* as
    logits, ``softmax(p_d / T)``, while the student is compared at temperature 1
    and there is no ``T^2`` factor. The KL is summed over classes and averaged
    over the batch (over the valid pixels / tokens for ``(B, C, H, W)`` /
    ``(B, T, V)`` logits, each with its own label; see the module docstring);
    the official code averages over all ``B * C`` entries instead
    (``nn.KLDivLoss()``'s element-wise mean), i.e. this value divided by ``C``
    -- :class:`lightning_kd.methods.tfkd.TfKDVirtual` applies that factor.

    Args:
        student_logits: ``(B, C)``, ``(B, C, H, W)`` or ``(B, T, V)`` student logits, ``C >= 2``.
        target: integer labels, ``(B,)`` for ``(B, C)``, else the positions'
            shape; positions labelled ``ignore_index`` are left out.
        correct_prob: probability ``a`` of the labelled class in the hand-designed teacher.
        temperature: softening temperature ``T`` of the hand-designed teacher (positive).
        class_dim: the dimension holding the classes; default 1 for 2-D and
            4-D logits, the last one for 3-D.
        mask: optional boolean tensor of the positions' shape, True = the position counts.
        ignore_index: label of the positions to leave out.

    Returns:
        0-d float32 tensor (0 when no position is valid).

    Example:
        >>> s = torch.tensor([[0.9, 0.05, 0.05]])  # the student's logits equal p_d: same softmax at T = 1
        >>> abs(virtual_teacher_loss(s, torch.tensor([0]), correct_prob=0.9, temperature=1.0).item()) < 1e-6
        True
    """
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with _autocast_off(student_logits.device):
        pos = _positions(student_logits, None, class_dim=class_dim, mask=mask, target=target,
                         ignore_index=ignore_index)
        num_classes = pos.student.shape[1]
        teacher = F.softmax(virtual_teacher_probs(pos.target, num_classes, correct_prob) / float(temperature), dim=1)
        log_p_s = F.log_softmax(pos.student, dim=1)
        return _mean_over_positions(_per_sample_kl(log_p_s, teacher), pos.valid)

