"""CTKD's learnable temperature: its range, the gradient reversal that trains it against the student, and the
cosine curriculum of the reversal strength.

Paper: Z. Li, X. Li, L. Yang, B. Zhao, R. Song, L. Luo, J. Li, J. Yang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023.

* :func:`gradient_reversal` -- identity forward, ``-lambda * grad`` backward.
* :func:`ctkd_temperature` -- the raw parameter mapped into ``[min, max]`` through the reversal.
* :func:`cosine_lambda` -- the reversal strength per epoch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import Tensor

__all__ = ["gradient_reversal", "ctkd_temperature", "cosine_lambda"]


def _autocast_off(device: torch.device) -> ContextManager:
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return nullcontext()


class _GradientReversalFn(torch.autograd.Function):
    """Identity in the forward pass, ``-lambda * grad`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return grad_output * (-ctx.lambda_), None


def gradient_reversal(x: Tensor, lambda_: float = 1.0) -> Tensor:
    r"""Gradient reversal: identity forward, gradient multiplied by ``-lambda_``.

    Paper: used by CTKD -- Z. Li, X. Li, L. Yang, B. Zhao, R. Song, L. Luo,
    J. Li, J. Yang, "Curriculum Temperature for Knowledge Distillation",
    AAAI 2023 -- following Y. Ganin, V. Lempitsky, "Unsupervised Domain
    Adaptation by Backpropagation", ICML 2015.

    Formula: ``y = x``; ``dL/dx = -lambda_ * dL/dy``.

    Reduction: none (element-wise).  Convention: ``lambda_`` is the
    non-negative magnitude (the paper's ``lambda``); the sign flip is done
    here.  (The official CTKD code instead feeds a schedule running from 0 to
    -1 into a layer that multiplies the gradient by it; the result is the
    same.)

    Args:
        x: any tensor.
        lambda_: python float, the scale of the reversed gradient.

    Returns:
        a copy of ``x`` whose backward pass reverses and scales the gradient.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gradient_reversal(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000])
    """
    return _GradientReversalFn.apply(x, float(lambda_))


def ctkd_temperature(
    raw_temperature: Tensor,
    lambda_: float,
    min_temperature: float = 1.0,
    max_temperature: float = 21.0,
) -> Tensor:
    r"""Map CTKD's unconstrained learnable temperature into ``[min, max]``.

    Paper: Z. Li, X. Li, L. Yang, B. Zhao, R. Song, L. Luo, J. Li, J. Yang,
    "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

    Formula: ``T = T_min + (T_max - T_min) * sigmoid(GRL_lambda(theta))``.

    Reduction: none (element-wise).  Conventions of the official global
    temperature module (``models/temp_global.py`` and ``helper/loops.py``): the
    parameter ``theta`` is a single scalar initialised to 1.0 (so the initial
    temperature is ``1 + 20 * sigmoid(1) ~= 15.62``); the range is
    ``t_start = 1`` plus ``t_end = 20`` times the sigmoid, i.e. ``[1, 21]``; the
    gradient reversal makes ``theta`` *ascend* the distillation loss (the
    temperature plays adversarially against the student, which descends it),
    with the strength ``lambda_`` given by :func:`cosine_lambda`.  Use the
    returned 0-d tensor as the ``temperature`` of :func:`~lightning_kd.losses.kd_loss`.

    Args:
        raw_temperature: the learnable parameter ``theta`` (any shape, usually
            0-d or one element).
        lambda_: python float, gradient-reversal strength for this epoch.
        min_temperature: lower end of the range.
        max_temperature: upper end of the range.

    Returns:
        float32 tensor of the shape of ``raw_temperature`` with values in
        ``[min_temperature, max_temperature]``.

    Example:
        >>> theta = torch.tensor(0.0, requires_grad=True)
        >>> T = ctkd_temperature(theta, lambda_=1.0)
        >>> T.item()
        11.0
        >>> T.backward()  # d T / d theta = 20 * 0.25, reversed
        >>> theta.grad.item()
        -5.0
    """
    if not max_temperature > min_temperature:
        raise ValueError(
            f"max_temperature ({max_temperature}) must exceed min_temperature ({min_temperature})"
        )
    with _autocast_off(raw_temperature.device):
        theta = gradient_reversal(raw_temperature.float(), lambda_)
        return min_temperature + (max_temperature - min_temperature) * torch.sigmoid(theta)


def cosine_lambda(
    epoch: float, max_lambda: float = 1.0, min_lambda: float = 0.0, warmup_epochs: float = 10
) -> float:
    r"""CTKD's cosine curriculum for the gradient-reversal strength ``lambda``.

    Paper: Z. Li, X. Li, L. Yang, B. Zhao, R. Song, L. Luo, J. Li, J. Yang,
    "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

    Formula: ``lambda_n = l_min + 0.5 * (l_max - l_min) * (1 + cos((1 + min(n, E) / E) * pi))``,
    i.e. ``l_min + 0.5 * (l_max - l_min) * (1 - cos(pi * min(n, E) / E))``.

    Reduction: none (scalar schedule).  ``lambda`` rises from ``min_lambda`` at
    epoch 0 to ``max_lambda`` at ``warmup_epochs`` and stays there; negative
    epochs are clamped to 0.  Official CIFAR-100 defaults: ``l_min = 0``,
    ``l_max = 1``, ``E = 10`` (``--decay_max 0 --decay_min -1 --decay_loops 10``
    in the official scripts, whose sign is folded into
    :func:`gradient_reversal` here); the official loop evaluates the schedule
    with 1-based epoch numbers.

    Args:
        epoch: current epoch (may be fractional).
        max_lambda: final strength.
        min_lambda: initial strength.
        warmup_epochs: number of epochs ``E`` of the cosine ramp; ``<= 0`` means
            ``max_lambda`` throughout.

    Returns:
        python float.

    Example:
        >>> [round(cosine_lambda(e), 4) for e in (0, 5, 10, 100)]
        [0.0, 0.5, 1.0, 1.0]
    """
    if warmup_epochs <= 0:
        return float(max_lambda)
    n = min(max(float(epoch), 0.0), float(warmup_epochs))
    return float(
        min_lambda + 0.5 * (max_lambda - min_lambda) * (1.0 - math.cos(math.pi * n / warmup_epochs))
    )
