"""Token-level divergences against a sparse teacher: its top-``k`` log-probabilities plus one tail bucket.

A teacher's next-token distribution ``p = softmax(z_t / T)`` over ``V`` tokens is stored as the ``k`` largest
log-probabilities ``log p_i`` and their token ids ``I`` (:func:`sparse_teacher`); the probability left outside them,
``p_tail = 1 - sum_{i in I} p_i``, is one more bucket. The student's distribution ``q = softmax(z_s / T)`` is collapsed
to the same ``k + 1`` buckets: ``q_i`` for ``i in I`` and ``q_tail = sum_{v not in I} q_v`` (a log-sum-exp over the
tokens outside ``I``). Every divergence is then evaluated between the two ``(k + 1)``-bucket distributions ``p̂`` and
``q̂`` with the formulas of :mod:`lightning_kd.losses.token` (forward KL ``KL(p̂ || q̂)``, reverse KL ``KL(q̂ || p̂)``,
generalized JSD(beta) of GKD, the skew KLs of DistiLLM, total variation ``1/2 sum |p̂ - q̂|``). By the data-processing
inequality each bucketed divergence is at most the full one; the top-``k`` terms are exact and only the
distribution inside the tail is lost. With ``k = V`` the tail is empty on both sides and the values equal the dense
losses of :mod:`lightning_kd.losses.token`.

Tail conventions: when ``k = V`` (the indices cover the vocabulary) the teacher's tail is exactly 0; when ``k < V``
it is ``max(1 - sum p_i, TAIL_FLOOR)`` with ``TAIL_FLOOR = 1e-8`` (float16 storage can round it to 0 or below, which
would make the reverse KL infinite). ``0 log 0 = 0`` throughout.

Masking, causal ``shift`` and the reduction (the sum over valid tokens divided by ``num_valid_tokens``, e.g.
:func:`~lightning_kd.losses.token.global_token_count`) are those of
:func:`~lightning_kd.losses.token.token_distillation_loss`; the sparse teacher's ``values`` and ``indices`` are aligned
with the logits' positions (shifted with them). Everything is computed in float32 with autocast off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses.token import (
    _autocast_off,
    _check_temperature,
    _log_probs,
    divergence_from_log_probs,
    reduce_tokens,
    shift_logits,
    valid_token_mask,
)

__all__ = [
    "SPARSE_DIVERGENCES",
    "TAIL_FLOOR",
    "sparse_teacher",
    "sparse_buckets",
    "sparse_divergence_per_token",
    "sparse_token_distillation_loss",
]

TAIL_FLOOR = 1e-8
# stands for log 0 in the buckets: finite, so that 0 * (log a - log b) stays 0 and gradients stay finite
_LOG_ZERO = -1e30
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def sparse_teacher(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's top-``k`` log-probabilities at ``temperature`` and their token ids: ``(values, indices)`` of
    shape ``[..., k]`` (float32 ``log softmax(z / T)``, largest first; int64 ids).

    Example:
        >>> values, indices = sparse_teacher(torch.log(torch.tensor([[0.1, 0.6, 0.3]])), k=2)
        >>> indices.tolist(), [round(v, 4) for v in values.exp()[0].tolist()]
        ([[1, 2]], [0.6, 0.3])
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {vocab}")
    temperature = _check_temperature(temperature)
    with _autocast_off(teacher_logits.device):
        return _log_probs(teacher_logits, temperature).topk(k, dim=-1)


def _check_sparse(student_logits: Tensor, values: Tensor, indices: Tensor) -> None:
    if student_logits.dim() < 2:
        raise ValueError(f"expected student logits of shape (B, T, V) or (N, V), got {tuple(student_logits.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"the sparse teacher's values and indices must have the same shape, got {tuple(values.shape)} "
                         f"and {tuple(indices.shape)}")
    if values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"the sparse teacher has positions {tuple(values.shape[:-1])} but the student logits "
                         f"{tuple(student_logits.shape[:-1])}: pass the teacher's top-k of the same tokens")
    if values.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"the sparse teacher keeps k={values.shape[-1]} entries but the student has only "
                         f"{student_logits.shape[-1]} logits: use k <= the vocabulary size")


def sparse_buckets(student_logits: Tensor, values: Tensor, indices: Tensor, temperature: float | Tensor = 1.0
                   ) -> tuple[Tensor, Tensor]:
    """``(log p̂, log q̂)``, each ``[..., k + 1]``: the teacher's stored log-probabilities with its tail
    ``log p_tail`` appended, and the student's log-probabilities at ``indices`` with ``log q_tail`` appended (float32;
    an empty bucket holds a large negative number standing for log 0)."""
    _check_sparse(student_logits, values, indices)
    temperature = _check_temperature(temperature)
    vocab, k = student_logits.shape[-1], values.shape[-1]
    with _autocast_off(student_logits.device):
        log_q_all = _log_probs(student_logits, temperature)
        indices = indices.to(log_q_all.device).long()
        log_q_top = log_q_all.gather(-1, indices)
        log_p_top = values.to(log_q_all.device).float().clamp(min=_LOG_ZERO)
        if k == vocab:
            log_q_tail = log_q_top.new_full(log_q_top.shape[:-1] + (1,), _LOG_ZERO)
            log_p_tail = log_q_tail
        else:
            outside = log_q_all.scatter(-1, indices, _LOG_ZERO)
            log_q_tail = torch.logsumexp(outside, dim=-1, keepdim=True).clamp(min=_LOG_ZERO)
            kept = torch.logsumexp(log_p_top, dim=-1, keepdim=True)
            log_p_tail = torch.log((-torch.expm1(kept.clamp(max=0.0))).clamp(min=TAIL_FLOOR))
        return torch.cat([log_p_top, log_p_tail], -1), torch.cat([log_q_top, log_q_tail], -1)


def sparse_divergence_per_token(student_logits: Tensor, values: Tensor, indices: Tensor,
                                divergence: str = "forward_kl", *, temperature: float | Tensor = 1.0,
                                beta: float = 0.5, skew: float = 0.1, normalize: bool = False) -> Tensor:
    """The divergence named ``divergence`` between the ``k + 1`` buckets of the sparse teacher ``p̂`` and the
    collapsed student ``q̂`` (module docstring), one value per position (no mask, no reduction).

    ``"forward_kl"`` ``KL(p̂ || q̂)``, ``"reverse_kl"`` ``KL(q̂ || p̂)``, ``"jsd"`` GKD's JSD(beta) (``beta = 0`` forward,
    ``beta = 1`` reverse KL; ``normalize`` divides by ``beta (1 - beta)``), ``"skew_forward_kl"``
    ``KL(p̂ || skew p̂ + (1 - skew) q̂)``, ``"skew_reverse_kl"`` ``KL(q̂ || (1 - skew) p̂ + skew q̂)``, ``"tvd"``
    ``1/2 sum |p̂ - q̂|``; the student at ``temperature`` (the teacher's values are already log-probabilities).

    Example (``k = 1`` of 3 tokens: buckets {token 0, rest}; teacher (0.5, 0.5), student (1/3, 2/3)):
        >>> s = torch.zeros(1, 3)
        >>> v, i = torch.log(torch.tensor([[0.5]])), torch.tensor([[0]])
        >>> round(sparse_divergence_per_token(s, v, i).item(), 4)  # 0.5 ln 1.5 + 0.5 ln 0.75
        0.0589
    """
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(SPARSE_DIVERGENCES)}")
    log_p, log_q = sparse_buckets(student_logits, values, indices, temperature)
    with _autocast_off(log_p.device):
        return divergence_from_log_probs(log_p, log_q, divergence, beta=beta, skew=skew, normalize=normalize)


def sparse_token_distillation_loss(student_logits: Tensor, values: Tensor, indices: Tensor,
                                   labels: Tensor | None = None, *, divergence: str = "forward_kl",
                                   mask: Tensor | None = None, temperature: float | Tensor = 1.0,
                                   scale_by_temperature_squared: bool = False, shift: bool = False,
                                   ignore_index: int = -100, num_valid_tokens: int | float | Tensor | None = None,
                                   beta: float = 0.5, skew: float = 0.1, normalize: bool = False) -> Tensor:
    """:func:`~lightning_kd.losses.token.token_distillation_loss` against a sparse teacher ``(values, indices)``
    (from :func:`sparse_teacher` at the same ``temperature``): ``L = s * sum_{valid t} D(p̂_t, q̂_t) /
    num_valid_tokens``, ``s = T^2`` when ``scale_by_temperature_squared``. ``values``/``indices`` are ``[B, T, k]``
    aligned with the logits ``[B, T, V]`` (with ``shift`` the last position of all three is dropped); ``labels`` and
    ``mask`` ``[B, T]`` aligned with the input tokens. Returns a 0-d float32 tensor.

    Example (one token counts; k = V = 2: the dense forward KL 0.75 ln 1.5 + 0.25 ln 0.5):
        >>> s = torch.zeros(1, 2, 2)
        >>> v, i = sparse_teacher(torch.log(torch.tensor([[[0.5, 0.5], [0.75, 0.25]]])), k=2)
        >>> round(sparse_token_distillation_loss(s, v, i, torch.tensor([[-100, 1]])).item(), 4)
        0.1308
    """
    _check_sparse(student_logits, values, indices)
    if shift:
        student_logits = shift_logits(student_logits)
        values, indices = values[:, :-1], indices[:, :-1]
        positions = (student_logits.shape[0], student_logits.shape[1] + 1)
    else:
        positions = tuple(student_logits.shape[:-1])
    valid = valid_token_mask(positions, labels, mask, shift=shift, ignore_index=ignore_index,
                             device=student_logits.device)
    per_token = sparse_divergence_per_token(student_logits, values, indices, divergence, temperature=temperature,
                                            beta=beta, skew=skew, normalize=normalize)
    if scale_by_temperature_squared:
        per_token = per_token * _check_temperature(temperature) ** 2
    return reduce_tokens(per_token, valid, num_valid_tokens)
