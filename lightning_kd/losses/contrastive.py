"""Contrastive distillation losses (functional API).

:func:`crd_loss` is the objective of Contrastive Representation Distillation (Tian et al., ICLR 2020): for each
sample, its embedding on one side (student or teacher) must pick out the same sample's entry in the other side's
memory bank among ``K`` negatives, scored by noise-contrastive estimation (NCE). The pieces are separate:

* :func:`contrast_scores` -- ``exp(m_j · a / T)`` of an anchor ``a`` against memory rows ``m_j``;
* :func:`nce_normalizer` -- the constant ``Z`` that turns scores into probabilities, estimated once;
* :func:`nce_loss` -- the NCE objective on the normalised scores.

Scores are evaluated in float32 with autocast disabled (``exp(1 / 0.07)`` overflows float16). Reductions follow
``crd/criterion.py`` and ``crd/memory.py`` of the official RepDistiller code, so its loss weight (0.8) transfers.

>>> import torch.nn.functional as F
>>> anchors = F.normalize(torch.randn(4, 8), dim=1)
>>> memory = F.normalize(torch.randn(20, 8), dim=1)
>>> contrast_index = torch.randint(0, 20, (4, 1 + 5))
>>> scores = contrast_scores(anchors, memory, contrast_index, temperature=0.07)
>>> scores.shape
torch.Size([4, 6])
>>> bool(nce_loss(scores / nce_normalizer(scores, 20), num_samples=20) > 0)
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses.logit import _autocast_off

__all__ = ["contrast_scores", "crd_loss", "nce_loss", "nce_normalizer"]

# Added to the NCE denominators, as in the reference.
_NCE_EPS = 1e-7


def contrast_scores(anchors: Tensor, memory: Tensor, contrast_index: Tensor, temperature: float) -> Tensor:
    """``exp(memory[contrast_index[b, j]] · anchors[b] / temperature)``, shape ``(B, 1 + K)`` in float32.

    Args:
        anchors: ``(B, D)`` embeddings (unit length in CRD); gradients flow to them.
        memory: ``(N, D)`` memory bank rows (no gradient).
        contrast_index: ``(B, 1 + K)`` rows of ``memory`` per anchor, the positive first.
        temperature: the NCE temperature ``T``.
    """
    if anchors.dim() != 2 or memory.dim() != 2 or anchors.shape[1] != memory.shape[1]:
        raise ValueError(f"expected anchors (B, D) and memory (N, D), got {tuple(anchors.shape)} and "
                         f"{tuple(memory.shape)}")
    if contrast_index.dim() != 2 or contrast_index.shape[0] != anchors.shape[0]:
        raise ValueError(f"expected contrast_index (B, 1 + K) with B={anchors.shape[0]}, got "
                         f"{tuple(contrast_index.shape)}")
    with _autocast_off(anchors.device):
        # one (B, N) product, then the K + 1 entries per row: far less memory than gathering (B, K + 1, D) rows
        similarity = anchors.float() @ memory.detach().float().T
        return torch.exp(similarity.gather(1, contrast_index) / temperature)


def nce_normalizer(scores: Tensor, num_samples: int) -> Tensor:
    """The NCE constant ``Z = N · mean(scores)`` (Monte-Carlo estimate of the partition function over the ``N``
    samples), detached. CRD estimates it on the first batch and keeps it fixed."""
    return scores.detach().float().mean() * num_samples


def nce_loss(probabilities: Tensor, num_samples: int) -> Tensor:
    """NCE loss of ``probabilities`` ``(B, 1 + K)`` (positive in column 0) against a uniform noise ``P_n = 1/N``.

    ``loss = −(1/B) Σ_b [log(p_b0 / (p_b0 + K/N + ε)) + Σ_{k≥1} log((K/N) / (p_bk + K/N + ε))]`` with ``ε = 1e-7``:
    summed over the positive and the ``K`` negatives, averaged over the batch (RepDistiller ``ContrastLoss``,
    CRD Eq. 18).
    """
    if probabilities.dim() != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"expected probabilities (B, 1 + K) with K >= 1, got {tuple(probabilities.shape)}")
    with _autocast_off(probabilities.device):
        p = probabilities.float()
        noise = (p.shape[1] - 1) / num_samples
        positive, negatives = p[:, 0], p[:, 1:]
        log_positive = torch.log(positive / (positive + noise + _NCE_EPS))
        log_negatives = torch.log(noise / (negatives + noise + _NCE_EPS))
        return -(log_positive.sum() + log_negatives.sum()) / p.shape[0]


def crd_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, student_memory: Tensor, teacher_memory: Tensor,
             contrast_index: Tensor, normalizers: tuple[Tensor | float, Tensor | float],
             temperature: float = 0.07) -> Tensor:
    """The CRD objective: NCE of the student's embeddings against the teacher's memory plus NCE of the teacher's
    embeddings against the student's memory.

    ``loss = nce(contrast(s, M_t) / Z_s) + nce(contrast(t, M_s) / Z_t)`` (:func:`nce_loss` with ``N`` the memory
    size, each term a batch mean).

    Args:
        student_embeddings: ``(B, D)`` unit-length student embeddings.
        teacher_embeddings: ``(B, D)`` unit-length teacher embeddings.
        student_memory: ``(N, D)`` memory bank of student embeddings.
        teacher_memory: ``(N, D)`` memory bank of teacher embeddings.
        contrast_index: ``(B, 1 + K)`` memory rows per sample, the sample's own index first, then its negatives.
        normalizers: ``(Z_s, Z_t)``, the NCE constants of the student-anchored and the teacher-anchored scores.
        temperature: the NCE temperature (0.07 in the reference).
    """
    num_samples = student_memory.shape[0]
    if teacher_memory.shape[0] != num_samples:
        raise ValueError(f"the memories differ in size: {student_memory.shape[0]} and {teacher_memory.shape[0]} rows")
    student_normalizer, teacher_normalizer = normalizers
    student_anchored = contrast_scores(student_embeddings, teacher_memory, contrast_index, temperature)
    teacher_anchored = contrast_scores(teacher_embeddings, student_memory, contrast_index, temperature)
    return (nce_loss(student_anchored / student_normalizer, num_samples)
            + nce_loss(teacher_anchored / teacher_normalizer, num_samples))
