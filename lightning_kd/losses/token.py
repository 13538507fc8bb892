"""Token-level divergences between a student's and a teacher's next-token distributions (language models).

Every function takes raw logits of shape ``(B, T, V)`` or ``(N, V)``, upcasts them to float32 and evaluates with
autocast disabled. ``p`` is the teacher's distribution ``softmax(teacher_logits / T)`` and ``q`` the student's
``softmax(student_logits / T)``; "forward KL" is ``KL(p || q)`` (teacher first, mode-covering) and "reverse KL" is
``KL(q || p)`` (student first, mode-seeking).

Two layers:

* ``*_per_token`` functions: one value per position (shape of the logits without the vocabulary dimension), no
  masking, no reduction, no ``T^2`` factor; :func:`divergence_per_token` picks one by name. The chunked path
  (:mod:`lightning_kd.losses.chunked`) uses these.
* ``*_loss`` functions: shift, mask, scale and reduce. Reduction: the sum over valid tokens divided by
  ``num_valid_tokens``, which defaults to the local count of valid tokens. Pass the count of the whole optimizer
  step (:func:`global_token_count`, summed over gradient-accumulation micro-batches) so that every token weighs the
  same however the tokens fall into micro-batches and ranks.

Masking: a position is valid when ``labels != ignore_index`` and ``mask`` is true/non-zero (either may be omitted).
``labels`` and ``mask`` are aligned with the input tokens, like Hugging Face's ``labels`` and ``attention_mask``.
With ``shift=True`` the logits at position ``t`` predict token ``t + 1``: the last position of the logits and the
first of ``labels``/``mask`` are dropped, so a prediction counts when the token it predicts is valid.

Implemented:

* :func:`forward_kl_loss`, :func:`reverse_kl_loss`.
* :func:`generalized_jsd_loss` -- generalized JSD(beta) of GKD, Agarwal et al., "On-Policy Distillation of Language
  Models: Learning from Self-Generated Mistakes", ICLR 2024.
* :func:`skew_forward_kl_loss`, :func:`skew_reverse_kl_loss` -- alpha-skew KL / skew reverse KL of DistiLLM, Ko et al.,
  "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
* :func:`total_variation_loss` -- total variation distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.logit import _autocast_off

__all__ = [
    "divergence_from_log_probs",
    "DIVERGENCES",
    "divergence_per_token",
    "forward_kl_per_token",
    "reverse_kl_per_token",
    "generalized_jsd_per_token",
    "skew_forward_kl_per_token",
    "skew_reverse_kl_per_token",
    "total_variation_per_token",
    "token_distillation_loss",
    "forward_kl_loss",
    "reverse_kl_loss",
    "generalized_jsd_loss",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "total_variation_loss",
    "valid_token_mask",
    "shift_logits",
    "global_token_count",
    "reduce_tokens",
]

# Scaled logits are clamped here so that logits of -inf (masked vocabulary entries) give 0 * finite = 0 rather than
# 0 * inf = nan in p * (log p - log m).
_LOGIT_FLOOR = -1e30


def _check_temperature(temperature: float | Tensor) -> float | Tensor:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number or a one-element tensor, got shape "
                             f"{tuple(temperature.shape)}")
        return temperature.float().reshape(())
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _log_probs(logits: Tensor, temperature: float | Tensor) -> Tensor:
    scaled = logits.float() / temperature  # a new tensor: clamping it in place leaves the caller's logits alone
    return F.log_softmax(scaled.clamp_(min=_LOGIT_FLOOR), dim=-1)


def _kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum_v a_v (log a_v - log b_v)`` over the last dimension."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)``, computed in log space."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() < 2:
        raise ValueError(f"expected logits of shape (B, T, V) or (N, V), got shape {tuple(student_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (" (the vocabularies differ: if one is padded, slice both to the shared vocabulary, e.g. "
                    "logits[..., :n], see lightning_kd.models.hf.check_vocab)")
        raise ValueError(f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}{hint}")


# --------------------------------------------------------------------------- #
# per-token divergences
# --------------------------------------------------------------------------- #
def divergence_from_log_probs(log_p: Tensor, log_q: Tensor, divergence: str = "forward_kl", *, beta: float = 0.5,
                              skew: float = 0.1, normalize: bool = False) -> Tensor:
    """The divergence named ``divergence`` between the teacher's ``log p`` and the student's ``log q`` (float32
    log-probabilities over the last dimension, finite), one value per position: what every per-token divergence of
    this module and of :mod:`lightning_kd.losses.sparse` computes once its two distributions are formed."""
    if divergence == "forward_kl":
        return _kl_from_log_probs(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_from_log_probs(log_q, log_p)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "jsd":
        beta = _check_fraction("beta", beta)
        if beta == 0.0:
            return _kl_from_log_probs(log_p, log_q)
        if beta == 1.0:
            return _kl_from_log_probs(log_q, log_p)
        log_m = _log_mixture(log_p, log_q, beta)
        jsd = beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
        return jsd / (beta * (1.0 - beta)) if normalize else jsd
    skew = _check_fraction("skew", skew)
    if divergence == "skew_forward_kl":
        return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, skew))
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")


def _per_token(student_logits: Tensor, teacher_logits: Tensor, divergence: str, temperature: float | Tensor,
               **options: Any) -> Tensor:
    _check_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    with _autocast_off(student_logits.device):
        log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
        return divergence_from_log_probs(log_p, log_q, divergence, **options)


def forward_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per position (teacher ``p``, student ``q``).

    Example:
        >>> s = torch.zeros(1, 2)
        >>> t = torch.log(torch.tensor([[0.75, 0.25]]))
        >>> round(forward_kl_per_token(s, t).item(), 4)  # 0.75 ln 1.5 + 0.25 ln 0.5
        0.1308
    """
    return _per_token(student_logits, teacher_logits, "forward_kl", temperature)


def reverse_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` per position (student ``q``, teacher ``p``)."""
    return _per_token(student_logits, teacher_logits, "reverse_kl", temperature)


def generalized_jsd_per_token(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                              temperature: float | Tensor = 1.0, normalize: bool = False) -> Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) of GKD (Agarwal et al., ICLR 2024, Sec. 3) per position.

    ``JSD(beta)(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``, teacher ``p``
    and student ``q`` (the paper's ``D(p_T || p_S)``); ``beta = 0.5`` is the ordinary JSD.

    JSD(beta) itself vanishes at both ends (``m`` becomes ``q`` or ``p``); the paper reads ``beta -> 0`` as forward
    KL and ``beta -> 1`` as reverse KL because ``JSD(beta) / beta -> KL(p || q)`` and
    ``JSD(beta) / (1 - beta) -> KL(q || p)``. Convention here: ``beta = 0`` returns the forward KL ``KL(p || q)`` and
    ``beta = 1`` the reverse KL ``KL(q || p)`` exactly; inside ``(0, 1)`` the paper's JSD(beta) is returned
    unscaled, so published ``beta`` values and loss weights carry over. With ``normalize=True`` the value is divided
    by ``beta (1 - beta)``, which makes it continuous on ``[0, 1]`` (it tends to the two KLs at the ends).
    """
    return _per_token(student_logits, teacher_logits, "jsd", temperature, beta=beta, normalize=normalize)


def skew_forward_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1,
                              temperature: float | Tensor = 1.0) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024, Eq. 4) per position: ``KL(p || skew p + (1 - skew) q)``.

    Teacher ``p``, student ``q``. ``skew = 0`` is the forward KL ``KL(p || q)``; ``skew = 1`` gives 0. Default 0.1,
    the paper's value.
    """
    return _per_token(student_logits, teacher_logits, "skew_forward_kl", temperature, skew=skew)


def skew_reverse_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1,
                              temperature: float | Tensor = 1.0) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., ICML 2024, Eq. 5) per position: ``KL(q || (1 - skew) p + skew q)``.

    Teacher ``p``, student ``q``. ``skew = 0`` is the reverse KL ``KL(q || p)``; ``skew = 1`` gives 0. Default 0.1,
    the paper's value.
    """
    return _per_token(student_logits, teacher_logits, "skew_reverse_kl", temperature, skew=skew)


def total_variation_per_token(student_logits: Tensor, teacher_logits: Tensor,
                              temperature: float | Tensor = 1.0) -> Tensor:
    """Total variation distance ``TVD(p, q) = 1/2 sum_v |p_v - q_v|`` per position (symmetric, in ``[0, 1]``)."""
    return _per_token(student_logits, teacher_logits, "tvd", temperature)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "jsd": generalized_jsd_per_token,
    "skew_forward_kl": skew_forward_kl_per_token,
    "skew_reverse_kl": skew_reverse_kl_per_token,
    "tvd": total_variation_per_token,
}


def divergence_per_token(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "forward_kl", *,
                         temperature: float | Tensor = 1.0, beta: float = 0.5, skew: float = 0.1,
                         normalize: bool = False) -> Tensor:
    """The divergence named ``divergence`` (a key of :data:`DIVERGENCES`) per position; ``beta`` and ``normalize``
    are read by ``"jsd"`` only, ``skew`` by the two skew divergences only."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[divergence]
    if divergence == "jsd":
        return fn(student_logits, teacher_logits, beta=beta, temperature=temperature, normalize=normalize)
    if divergence.startswith("skew_"):
        return fn(student_logits, teacher_logits, skew=skew, temperature=temperature)
    return fn(student_logits, teacher_logits, temperature=temperature)


# --------------------------------------------------------------------------- #
# masking, shifting, reduction
# --------------------------------------------------------------------------- #
def valid_token_mask(positions: torch.Size | tuple[int, ...], labels: Tensor | None = None,
                     mask: Tensor | None = None, *, shift: bool = False, ignore_index: int = -100,
                     device: torch.device | None = None) -> Tensor:
    """Boolean mask of the positions that count, shape ``positions`` (the logits' shape without ``V``) with the last
    position dropped when ``shift=True``.

    A position counts when ``labels != ignore_index`` and ``mask`` is non-zero (either may be ``None``). ``labels``
    and ``mask`` have the shape ``positions`` and are aligned with the input tokens; with ``shift=True`` their first
    position is dropped, so the prediction at ``t`` counts when token ``t + 1`` is valid.
    """
    positions = tuple(positions)
    if shift and len(positions) != 2:
        raise ValueError(f"shift=True needs logits of shape (B, T, V), got positions {positions}; shift before "
                         "flattening to (N, V)")
    out_shape = (positions[0], positions[1] - 1) if shift else positions
    valid = torch.ones(out_shape, dtype=torch.bool, device=device)
    for name, value in (("labels", labels), ("mask", mask)):
        if value is None:
            continue
        if tuple(value.shape) != positions:
            raise ValueError(f"{name} must have shape {positions} (the logits without the vocabulary dimension), got "
                             f"{tuple(value.shape)}")
        value = value[:, 1:] if shift else value
        value = value.to(valid.device)
        valid &= (value != ignore_index) if name == "labels" else value.bool()
    return valid


def shift_logits(logits: Tensor) -> Tensor:
    """``logits[:, :-1]``: the predictions of tokens ``1 .. T - 1`` from logits ``(B, T, V)``."""
    if logits.dim() != 3:
        raise ValueError(f"shift needs logits of shape (B, T, V), got {tuple(logits.shape)}")
    return logits[:, :-1]


def global_token_count(mask: Tensor, group=None) -> Tensor:
    """Number of valid tokens in ``mask`` summed over all ranks of ``group`` (all-reduced when
    ``torch.distributed`` is initialised), as a 0-d float32 tensor on ``mask``'s device.

    Pass it (summed over the micro-batches of one optimizer step when accumulating gradients) as
    ``num_valid_tokens`` of the losses. Each rank's loss is then its share of the global token mean; DDP averages
    gradients over ranks, so multiply the loss by the world size to get the gradient of the global token mean.
    """
    count = mask.sum(dtype=torch.float32) if mask.dtype == torch.bool else mask.ne(0).sum(dtype=torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM, group=group)
    return count


def reduce_tokens(per_token: Tensor, valid: Tensor, num_valid_tokens: int | float | Tensor | None = None) -> Tensor:
    """``sum(per_token[valid]) / num_valid_tokens`` (default: ``valid.sum()``); 0 when there is no valid token."""
    total = per_token.masked_fill(~valid, 0.0).sum()
    if num_valid_tokens is None:
        num_valid_tokens = valid.sum()
    if isinstance(num_valid_tokens, Tensor):
        return total / num_valid_tokens.to(total).clamp(min=1.0)
    return total / max(float(num_valid_tokens), 1.0)


# --------------------------------------------------------------------------- #
# reduced losses
# --------------------------------------------------------------------------- #
def token_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                            divergence: str = "forward_kl", mask: Tensor | None = None,
                            temperature: float | Tensor = 1.0, scale_by_temperature_squared: bool = False,
                            shift: bool = False, ignore_index: int = -100,
                            num_valid_tokens: int | float | Tensor | None = None, beta: float = 0.5,
                            skew: float = 0.1, normalize: bool = False) -> Tensor:
    """Token-level distillation loss with the divergence named ``divergence`` (see :data:`DIVERGENCES`).

    ``L = s * sum_{valid t} D(p_t, q_t) / num_valid_tokens`` with ``s = T^2`` when ``scale_by_temperature_squared``
    (Hinton et al., 2015: keeps gradient magnitudes independent of ``T``) and 1 otherwise. Masking and ``shift`` as
    in the module docstring. Returns a 0-d float32 tensor.

    Example (a two-token sequence, only the second token counts):
        >>> s = torch.zeros(1, 2, 2)
        >>> t = torch.log(torch.tensor([[[0.5, 0.5], [0.75, 0.25]]]))
        >>> round(token_distillation_loss(s, t, torch.tensor([[-100, 1]])).item(), 4)
        0.1308
    """
    _check_pair(student_logits, teacher_logits)
    if shift:
        student_logits, teacher_logits = shift_logits(student_logits), shift_logits(teacher_logits)
        positions = (student_logits.shape[0], student_logits.shape[1] + 1)
    else:
        positions = tuple(student_logits.shape[:-1])
    valid = valid_token_mask(positions, labels, mask, shift=shift, ignore_index=ignore_index,
                             device=student_logits.device)
    per_token = divergence_per_token(student_logits, teacher_logits, divergence, temperature=temperature,
                                     beta=beta, skew=skew, normalize=normalize)
    if scale_by_temperature_squared:
        per_token = per_token * _check_temperature(temperature) ** 2
    return reduce_tokens(per_token, valid, num_valid_tokens)


def forward_kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                    **kwargs) -> Tensor:
    """Forward KL ``KL(p_teacher || q_student)`` per token, reduced as :func:`token_distillation_loss` (whose keyword
    arguments it takes)."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="forward_kl", **kwargs)


def reverse_kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                    **kwargs) -> Tensor:
    """Reverse KL ``KL(q_student || p_teacher)`` per token, reduced as :func:`token_distillation_loss`."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", **kwargs)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         beta: float = 0.5, **kwargs) -> Tensor:
    """Generalized JSD(beta) of GKD (Agarwal et al., ICLR 2024) per token (:func:`generalized_jsd_per_token`:
    ``beta = 0`` is forward KL, ``beta = 1`` reverse KL), reduced as :func:`token_distillation_loss`. Default
    ``beta = 0.5`` (the ordinary JSD)."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="jsd", beta=beta, **kwargs)


def skew_forward_kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         skew: float = 0.1, **kwargs) -> Tensor:
    """Skew KL ``KL(p || skew p + (1 - skew) q)`` of DistiLLM (Ko et al., ICML 2024; default ``skew = 0.1`` as in the
    paper) per token, reduced as :func:`token_distillation_loss`."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="skew_forward_kl", skew=skew,
                                   **kwargs)


def skew_reverse_kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         skew: float = 0.1, **kwargs) -> Tensor:
    """Skew reverse KL ``KL(q || (1 - skew) p + skew q)`` of DistiLLM (Ko et al., ICML 2024; default ``skew = 0.1``)
    per token, reduced as :func:`token_distillation_loss`."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="skew_reverse_kl", skew=skew,
                                   **kwargs)


def total_variation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                         **kwargs) -> Tensor:
    """Total variation distance ``1/2 sum_v |p_v - q_v|`` per token, reduced as :func:`token_distillation_loss`."""
    return token_distillation_loss(student_logits, teacher_logits, labels, divergence="tvd", **kwargs)
