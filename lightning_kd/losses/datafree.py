"""Losses of data-free distillation (functional API): the student–teacher discrepancy a generator maximises and
the student minimises, and the BatchNorm-statistics prior that keeps generated inputs close to the data the
teacher was trained on.

* :func:`logit_l1_discrepancy` -- Fang et al., "Data-Free Adversarial Distillation", 2019 (DFAD).
* :func:`batch_moments`, :func:`bn_statistics_loss` -- Yin et al., "Dreaming to Distill: Data-free Knowledge
  Transfer via DeepInversion", CVPR 2020; used as the generator's prior by Choi et al., "Data-Free Network
  Quantization With Adversarial Knowledge Distillation", CVPR Workshops 2020.

The KL form of the discrepancy is :func:`lightning_kd.losses.kd_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batch_moments", "bn_statistics_loss", "logit_l1_discrepancy"]


def logit_l1_discrepancy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DFAD's model discrepancy: the mean absolute difference of the logits, ``mean_{i,c} |s_ic − t_ic|``.

    The mean runs over the batch and the classes (``F.l1_loss`` with its default reduction, as the official DFAD
    code). The student minimises it; the generator maximises it. Computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("student and teacher logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` of shape ``(N, C, *spatial)`` or ``(N, C)``, over the batch and
    every position: the statistics a BatchNorm layer normalises with in training mode. Computed in float32."""
    if x.dim() < 2:
        raise ValueError(f"expected a batch of shape (N, C, ...), got shape {tuple(x.shape)}")
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def bn_statistics_loss(inputs: Sequence[Tensor], running_means: Sequence[Tensor],
                       running_vars: Sequence[Tensor]) -> Tensor:
    """DeepInversion's feature-distribution prior, summed over BatchNorm layers ``l``:
    ``Σ_l ‖μ_l(x) − running_mean_l‖₂ + ‖σ²_l(x) − running_var_l‖₂``.

    ``inputs`` are the inputs of the teacher's BatchNorm layers for a batch ``x``; ``μ_l(x)`` and ``σ²_l(x)`` are their
    per-channel batch mean and biased variance (:func:`batch_moments`). The norms are the Euclidean norms over the
    channels (not squared) and the layers are summed unweighted, as ``r_feature`` in the official DeepInversion code
    (Yin et al., CVPR 2020, Eq. 3). Computed in float32.
    """
    if not len(inputs) == len(running_means) == len(running_vars):
        raise ValueError(f"got {len(inputs)} BatchNorm inputs but {len(running_means)} running means and "
                         f"{len(running_vars)} running variances: pass one of each per layer")
    if not inputs:
        raise ValueError("bn_statistics_loss needs at least one BatchNorm layer's input")
    total = inputs[0].new_zeros((), dtype=torch.float32)
    for x, running_mean, running_var in zip(inputs, running_means, running_vars):
        mean, var = batch_moments(x)
        total = total + torch.linalg.vector_norm(mean - running_mean.float()) \
            + torch.linalg.vector_norm(var - running_var.float())
    return total
