"""Token-level distillation straight from final hidden states, chunk by chunk, so that the ``(B, T, V)`` logits of
the student and the teacher never exist at once.

The language-model head (``logits = hidden @ W.T + b``) is applied to ``chunk_size`` tokens at a time, the divergence
(any of :data:`lightning_kd.losses.token.DIVERGENCES`) and the optional cross-entropy on the labels are summed for
the chunk, and the chunk's logits are dropped. Backward (a custom ``torch.autograd.Function``) recomputes one chunk's
logits at a time and adds its gradients into the gradients of the hidden states, head weight and bias in place: peak
memory grows with ``chunk_size * V`` (plus one gradient of the head weight) instead of ``B * T * V``. Only
the valid tokens (labels and mask as in :mod:`lightning_kd.losses.token`) are computed at all. Value and gradients
(w.r.t. the student's hidden states, head weight and bias) equal those of the dense computation; the teacher side is
never differentiated. ``benchmarks/lm_memory.py`` measures the memory saved.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.token import DIVERGENCES, divergence_per_token, valid_token_mask

__all__ = ["TokenLosses", "chunked_distillation_loss"]


class TokenLosses(NamedTuple):
    """The two sums of a language-model distillation step, each divided by the number of valid tokens."""

    distillation: Tensor
    ce: Tensor | None


def _positions(hidden: Tensor, name: str) -> tuple[int, ...]:
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, T, H) or (N, H), got {tuple(hidden.shape)}")
    return tuple(hidden.shape[:-1])


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name} head weight must have shape (V, {hidden.shape[-1]}) to match its hidden size, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name} head bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _teacher_logits(teacher_source: Tensor, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
                    rows: Tensor) -> Tensor:
    with torch.no_grad():
        if teacher_weight is None:  # the source already holds the teacher's logits
            return teacher_source.index_select(0, rows)
        return F.linear(teacher_source.index_select(0, rows), teacher_weight, teacher_bias)


def _sums(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None, options: dict
          ) -> tuple[Tensor, Tensor]:
    """Summed divergence and summed cross-entropy of one chunk."""
    per_token = divergence_per_token(student_logits, teacher_logits, options["divergence"],
                                     temperature=options["temperature"], beta=options["beta"], skew=options["skew"],
                                     normalize=options["normalize"])
    kd = per_token.sum()
    if targets is None:
        return kd, kd.new_zeros(())
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        ce = F.cross_entropy(student_logits.float(), targets, ignore_index=options["ignore_index"], reduction="sum")
    return kd, ce


class _ChunkedHeadLosses(torch.autograd.Function):
    """Forward: the summed divergence and cross-entropy, chunk by chunk, keeping nothing but the inputs. Backward:
    recompute each chunk's logits, take the gradient w.r.t. them and fold it into the gradients of the hidden
    states, head weight and bias in place, so one chunk's ``(chunk_size, V)`` tensors are alive at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, teacher_source, teacher_weight, teacher_bias, options,
                chunk_size):
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start:start + chunk_size]
            chunk_targets = None if targets is None else targets[start:start + chunk_size]
            student_logits = F.linear(hidden.index_select(0, chunk), weight, bias)
            teacher_logits = _teacher_logits(teacher_source, teacher_weight, teacher_bias, chunk)
            kd, ce = _sums(student_logits, teacher_logits, chunk_targets, options)
            kd_total += kd
            ce_total += ce
        ctx.save_for_backward(hidden, weight, bias, rows, targets, teacher_source, teacher_weight, teacher_bias)
        ctx.options, ctx.chunk_size = options, chunk_size
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return kd_total, ce_total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd, grad_ce):
        hidden, weight, bias, rows, targets, teacher_source, teacher_weight, teacher_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # float32 accumulators, so that low-precision weights sum their chunks' gradients as one matmul would
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        size = ctx.chunk_size
        for start in range(0, rows.numel(), size):
            chunk = rows[start:start + size]
            chunk_targets = None if targets is None else targets[start:start + size]
            chunk_hidden = hidden.index_select(0, chunk)
            with torch.enable_grad():
                with torch.autocast(ctx.autocast[0], enabled=ctx.autocast[1], dtype=ctx.autocast[2]):
                    student_logits = F.linear(chunk_hidden, weight, bias).detach().requires_grad_(True)
                teacher_logits = _teacher_logits(teacher_source, teacher_weight, teacher_bias, chunk)
                kd, ce = _sums(student_logits, teacher_logits, chunk_targets, ctx.options)
                (grad_logits,) = torch.autograd.grad(kd * grad_kd + ce * grad_ce, student_logits)
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden.index_add_(0, chunk, (grad_logits @ weight).float())
            if need_weight:
                grad_weight.addmm_(grad_logits.t().float(), chunk_hidden.float())
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
            del grad_logits, student_logits, teacher_logits
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return (cast(grad_hidden, hidden), cast(grad_weight, weight), cast(grad_bias, bias)) + (None,) * 7


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    beta: float = 0.5,
    skew: float = 0.1,
    normalize: bool = False,
    shift: bool = False,
    ignore_index: int = -100,
    num_valid_tokens: int | float | Tensor | None = None,
    compute_ce: bool | None = None,
    vocab_slice: int | None = None,
    chunk_size: int | None = 256,
) -> TokenLosses:
    """Divergence between the student's and the teacher's next-token distributions (and the student's
    cross-entropy on ``labels``) computed from final hidden states, ``chunk_size`` tokens at a time.

    ``distillation = s * sum_{valid t} D(p_t, q_t) / num_valid_tokens`` with ``s = T^2`` when
    ``scale_by_temperature_squared``; ``ce = sum_{valid t} -log q_t(labels_t) / num_valid_tokens`` at temperature 1
    (``None`` without labels or with ``compute_ce=False``). Both equal
    :func:`~lightning_kd.losses.token.token_distillation_loss` and ``F.cross_entropy`` on the full logits
    ``F.linear(hidden, weight, bias)``, in value and gradient.

    Args:
        student_hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states of the student (after its final norm).
        student_head_weight: ``(V, H)`` weight of the student's LM head (``student_head_bias``: ``(V,)`` or None).
        teacher_hidden, teacher_head_weight: the teacher's ``(B, T, H_t)`` hidden states and ``(V, H_t)`` head
            weight (``teacher_head_bias`` optional); or instead ``teacher_logits`` ``(B, T, V)``, e.g. cached.
        labels, mask: which tokens count (``labels != ignore_index`` and ``mask`` non-zero), aligned with the input
            tokens; with ``shift=True`` the hidden state at ``t`` predicts token ``t + 1``.
        divergence, temperature, beta, skew, normalize: as in :func:`~lightning_kd.losses.token.divergence_per_token`.
        num_valid_tokens: the normaliser (default: the number of valid tokens here); pass
            :func:`~lightning_kd.losses.token.global_token_count` over the whole optimizer step.
        vocab_slice: use only the first ``vocab_slice`` rows of both heads (a padded vocabulary, see
            :func:`lightning_kd.models.hf.check_vocab`).
        chunk_size: tokens per chunk; ``None`` computes all valid tokens at once with plain autograd (the dense
            reference).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    positions = _positions(student_hidden, "student_hidden")
    if shift and len(positions) != 2:
        raise ValueError(f"shift=True needs hidden states of shape (B, T, H), got {tuple(student_hidden.shape)}")
    _check_head(student_hidden, student_head_weight, student_head_bias, "student")
    if (teacher_logits is None) == (teacher_hidden is None or teacher_head_weight is None):
        raise ValueError("give the teacher either as teacher_hidden and teacher_head_weight, or as teacher_logits")
    if vocab_slice is not None:
        student_head_weight = student_head_weight[:vocab_slice]
        student_head_bias = None if student_head_bias is None else student_head_bias[:vocab_slice]
    if teacher_logits is not None:
        if tuple(teacher_logits.shape[:-1]) != positions:
            raise ValueError(f"teacher_logits must have shape {positions} + (V,), got {tuple(teacher_logits.shape)}")
        teacher_source = teacher_logits.detach()[..., :vocab_slice] if vocab_slice else teacher_logits.detach()
        teacher_source, teacher_weight = teacher_source.reshape(-1, teacher_source.shape[-1]), None
        teacher_vocab = teacher_source.shape[-1]
    else:
        if _positions(teacher_hidden, "teacher_hidden") != positions:
            raise ValueError(f"teacher_hidden must have the student's positions {positions}, got "
                             f"{tuple(teacher_hidden.shape)}")
        _check_head(teacher_hidden, teacher_head_weight, teacher_head_bias, "teacher")
        teacher_weight = teacher_head_weight.detach()[:vocab_slice]
        teacher_head_bias = None if teacher_head_bias is None else teacher_head_bias.detach()[:vocab_slice]
        teacher_source = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_vocab = teacher_weight.shape[0]
    if teacher_vocab != student_head_weight.shape[0]:
        raise ValueError(f"the student's head has {student_head_weight.shape[0]} outputs but the teacher's has "
                         f"{teacher_vocab}: with a shared tokenizer whose vocabulary one model pads, pass "
                         f"vocab_slice=<shared vocabulary size> (see lightning_kd.models.hf.check_vocab)")

    device = student_hidden.device
    valid = valid_token_mask(positions, labels, mask, shift=shift, ignore_index=ignore_index, device=device)
    if shift:
        batch_index, time_index = valid.nonzero(as_tuple=True)
        rows = batch_index * positions[1] + time_index
        target_rows = rows + 1
    else:
        rows = valid.reshape(-1).nonzero().squeeze(1)
        target_rows = rows
    compute_ce = labels is not None if compute_ce is None else compute_ce
    if compute_ce and labels is None:
        raise ValueError("compute_ce=True needs labels")
    targets = labels.to(device).reshape(-1).index_select(0, target_rows).long() if compute_ce else None

    options = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew, normalize=normalize,
                   ignore_index=ignore_index)
    flat_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if chunk_size is None:  # plain autograd on all valid tokens at once
        student_logits = F.linear(flat_hidden.index_select(0, rows), student_head_weight, student_head_bias)
        teacher_logits = _teacher_logits(teacher_source, teacher_weight, teacher_head_bias, rows)
        kd_total, ce_total = _sums(student_logits, teacher_logits, targets, options)
    else:
        kd_total, ce_total = _ChunkedHeadLosses.apply(flat_hidden, student_head_weight, student_head_bias, rows,
                                                      targets, teacher_source, teacher_weight, teacher_head_bias,
                                                      options, chunk_size)
    if num_valid_tokens is None:
        num_valid_tokens = rows.numel()
    if isinstance(num_valid_tokens, Tensor):
        denominator = num_valid_tokens.to(device=device, dtype=torch.float32).clamp(min=1.0)
    else:
        denominator = max(float(num_valid_tokens), 1.0)
    if scale_by_temperature_squared:
        kd_total = kd_total * temperature**2
    return TokenLosses(kd_total / denominator, ce_total / denominator if compute_ce else None)
