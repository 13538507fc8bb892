"""Relation-based distillation losses (functional API).

These losses compare how samples of a batch relate to each other (similarity
matrices, pairwise distances, angles, kernel correlations) rather than the
features themselves, so student and teacher features may have different
widths; only the batch sizes must agree.  Each function takes one pair of
tensors; every input of shape ``(B, ...)`` is flattened to ``(B, D)``.
Inputs are upcast with ``.float()`` and evaluated with autocast disabled, so
every result is a 0-d float32 tensor even under bf16/fp16 autocast.  The
reductions follow the reference implementations named in each docstring so
that the published loss weights transfer unchanged.

Implemented:

* :func:`sp_loss` -- Similarity-Preserving KD, Tung & Mori, ICCV 2019.
* :func:`pkt_loss` -- Probabilistic Knowledge Transfer, Passalis & Tefas,
  ECCV 2018.
* :func:`rkd_loss` -- Relational KD, Park et al., CVPR 2019.
* :func:`cc_loss` -- Correlation Congruence, Peng et al., ICCV 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.logit import _autocast_off

__all__ = ["sp_loss", "pkt_loss", "rkd_loss", "cc_loss"]

# Floor of the squared pairwise distances in RKD (as in the reference pdist).
_RKD_PDIST_EPS = 1e-12


def _flatten_pair(student: Tensor, teacher: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Check the batch sizes and return both inputs as float32 ``(B, D)``."""
    if student.dim() < 2 or teacher.dim() < 2:
        raise ValueError(
            f"{name}: expected inputs of shape (B, ...) with at least 2 dims, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student and teacher batch sizes differ "
            f"({student.shape[0]} vs {teacher.shape[0]})"
        )
    return student.float().flatten(1), teacher.float().flatten(1)


# --------------------------------------------------------------------------- #
# Similarity-Preserving KD
# --------------------------------------------------------------------------- #
def _normalized_gram(feat: Tensor) -> Tensor:
    return F.normalize(feat @ feat.t(), dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Similarity-preserving loss between batch similarity matrices.

    Paper: F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019.

    Formula: ``L = ||G_s - G_t||_F^2 / B^2`` with ``G = row_normalize(F F^T)``,
    ``F`` the ``(B, C*H*W)`` flattened features.

    Reduction (as in RepDistiller ``distiller_zoo/SP.py`` and mdistiller
    ``SP.py``): the squared entries of the difference are summed and divided
    by ``B^2``, i.e. averaged over the ``B x B`` matrix; rows are
    L2-normalised with ``F.normalize`` (eps ``1e-12``).  The reference returns
    a one-element vector; this returns a 0-d tensor.  Published weight: 3000
    (CRD benchmark, CIFAR-100), on the last stage's feature map (before
    global pooling).

    Args:
        student_feat: ``(B, ...)`` student features.
        teacher_feat: ``(B, ...)`` teacher features (any width).

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G_s = I
        >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # rows (1, 1) / sqrt(2)
        >>> round(sp_loss(s, t).item(), 4)  # 2 * (2 - sqrt(2)) / 4
        0.2929
    """
    with _autocast_off(student_feat.device):
        s, t = _flatten_pair(student_feat, teacher_feat, "sp_loss")
        return (_normalized_gram(s) - _normalized_gram(t)).pow(2).mean()


# --------------------------------------------------------------------------- #
# Probabilistic Knowledge Transfer
# --------------------------------------------------------------------------- #
def _cosine_conditional_probs(feat: Tensor, eps: float) -> Tensor:
    feat = feat / (feat.norm(dim=1, keepdim=True) + eps)
    feat = torch.where(torch.isnan(feat), torch.zeros_like(feat), feat)
    kernel = (feat @ feat.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic Knowledge Transfer with the cosine-similarity kernel.

    Paper: N. Passalis, A. Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018.

    Formula: ``L = mean_{i,j} p_t[j|i] * log((p_t[j|i] + eps) / (p_s[j|i] + eps))``
    with ``p[j|i] = K[i, j] / sum_k K[i, k]`` and ``K = (cos(x_i, x_j) + 1) / 2``.

    Reduction (as in the authors' code, copied into RepDistiller
    ``distiller_zoo/PKT.py`` and mdistiller ``PKT.py``): embeddings are divided
    by ``||x|| + eps`` (NaNs set to 0), the kernel includes the diagonal
    ``i = j``, ``eps`` is added to both probabilities inside the log, and the
    result is the mean over all ``B x B`` entries (the KL summed over ``j`` and
    divided by ``B^2``, not ``B``).  Published weight: 30000 (CRD benchmark,
    CIFAR-100), on the penultimate (globally pooled) embedding.

    Args:
        student_emb: ``(B, D_s)`` student embeddings (flattened if more dims).
        teacher_emb: ``(B, D_t)`` teacher embeddings.
        eps: numerical epsilon of the normalisation and of the log ratio.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # p_s rows (2/3, 1/3), (1/3, 2/3)
        >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # p_t rows (1/2, 1/2)
        >>> round(pkt_loss(s, t).item(), 4)  # 2 * (1/2) ln(9/8) / 4
        0.0294
    """
    with _autocast_off(student_emb.device):
        s, t = _flatten_pair(student_emb, teacher_emb, "pkt_loss")
        p_s = _cosine_conditional_probs(s, eps)
        p_t = _cosine_conditional_probs(t, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# --------------------------------------------------------------------------- #
# Relational KD
# --------------------------------------------------------------------------- #
def _normalized_pairwise_distances(emb: Tensor) -> Tensor:
    """Euclidean distance matrix divided by the mean of its positive entries."""
    sq = (emb.unsqueeze(0) - emb.unsqueeze(1)).pow(2).sum(dim=2)
    dist = sq.clamp(min=_RKD_PDIST_EPS).sqrt()
    off_diag = ~torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    dist = dist * off_diag
    positive = (dist > 0).to(dist.dtype)
    return dist / ((dist * positive).sum() / positive.sum())


def _triplet_angle_cosines(emb: Tensor) -> Tensor:
    """``cos`` of the angle at ``e_i`` between ``e_j`` and ``e_k``, flattened ``(B^3,)``.

    Entries with ``j = i`` or ``k = i`` are 0 (zero difference vectors).
    """
    diff = F.normalize(emb.unsqueeze(0) - emb.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    r"""Relational KD: distance-wise plus angle-wise structure of the batch.

    Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge
    Distillation", CVPR 2019.

    Formula: ``L = w_d * mean_{i,j} huber(d_s[i,j] / mu_s - d_t[i,j] / mu_t)
    + w_a * mean_{i,j,k} huber(cos_s<e_j - e_i, e_k - e_i> - cos_t<...>)``,
    ``mu`` the mean of the positive pairwise distances, ``huber`` the
    smooth-L1 function with threshold 1.

    Reduction (as in RepDistiller ``distiller_zoo/RKD.py``, mdistiller
    ``RKD.py`` and the authors' code, which uses ``'elementwise_mean'``, the
    old name of ``'mean'``): the distance term is ``F.smooth_l1_loss`` averaged
    over all ``B x B`` entries, the diagonal included (its distances are set to
    0); squared distances are floored at ``1e-12`` before the square root and
    ``mu`` averages the entries that are ``> 0``.  The angle term averages
    over all ``B^3`` triplets, including the degenerate ones (value 0).  The
    teacher side is computed without gradient.  Defaults ``w_d = 25``,
    ``w_a = 50`` are the paper's; the CRD benchmark (CIFAR-100) adds this loss
    with weight 1 on the penultimate (globally pooled) embedding.

    Args:
        student_emb: ``(B, D_s)`` student embeddings (flattened if more dims),
            ``B >= 2``.
        teacher_emb: ``(B, D_t)`` teacher embeddings.
        distance_weight: weight ``w_d`` of the distance-wise term.
        angle_weight: weight ``w_a`` of the angle-wise term.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right angle at 0
        >>> t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # collinear
        >>> round(rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0).item(), 4)  # 3.5 / 27
        0.1296
        >>> round(rkd_loss(s, 3.0 * s).item(), 6)  # invariant to scale
        0.0
    """
    with _autocast_off(student_emb.device):
        s, t = _flatten_pair(student_emb, teacher_emb, "rkd_loss")
        if s.shape[0] < 2:
            raise ValueError("rkd_loss needs a batch of at least 2 samples")
        with torch.no_grad():
            dist_t = _normalized_pairwise_distances(t)
            angle_t = _triplet_angle_cosines(t)
        loss_distance = F.smooth_l1_loss(_normalized_pairwise_distances(s), dist_t)
        loss_angle = F.smooth_l1_loss(_triplet_angle_cosines(s), angle_t)
        return distance_weight * loss_distance + angle_weight * loss_angle


# --------------------------------------------------------------------------- #
# Correlation Congruence
# --------------------------------------------------------------------------- #
def _taylor_rbf_correlation(emb: Tensor, gamma: float, p_order: int) -> Tensor:
    """``sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * (x_i . x_j)^p`` on unit vectors."""
    emb = F.normalize(emb, p=2, dim=1)
    sim = emb @ emb.t()
    corr = torch.zeros_like(sim)
    for p in range(p_order + 1):
        coeff = math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)
        corr = corr + coeff * sim.pow(p)
    return corr


def cc_loss(
    student_emb: Tensor, teacher_emb: Tensor, gamma: float = 0.4, p_order: int = 2
) -> Tensor:
    r"""Correlation Congruence with a Taylor-expanded Gaussian RBF kernel.

    Paper: B. Peng, X. Jin, J. Liu, S. Zhou, Y. Wu, Y. Liu, D. Li, Z. Zhang,
    "Correlation Congruence for Knowledge Distillation", ICCV 2019.

    Formula: ``L = mean_{i,j} (C_s[i,j] - C_t[i,j])^2`` with
    ``C[i,j] = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p`` on
    L2-normalised embeddings -- the order-``P`` Taylor expansion of
    ``exp(-gamma ||x_i - x_j||^2) = exp(-2 gamma) exp(2 gamma x_i . x_j)``.

    Reduction (as in ``kd_losses/cc.py`` of AberHu/Knowledge-Distillation-Zoo,
    the Taylor-kernel implementation, with its defaults ``gamma = 0.4``,
    ``P = 2``): ``F.mse_loss`` with ``'mean'`` over the ``B x B`` correlation
    matrices, diagonal included; only the correlation congruence term (no
    instance congruence).  Published weight: 100 in that repository's example
    script (CIFAR-10, ResNet-110 to ResNet-20, on the pooled embedding).
    RepDistiller's ``distiller_zoo/CC.py`` implements a different reduction and
    uses weight 0.02, so that weight does not transfer to this loss.

    Args:
        student_emb: ``(B, D_s)`` student embeddings (flattened if more dims).
        teacher_emb: ``(B, D_t)`` teacher embeddings.
        gamma: RBF kernel parameter.
        p_order: order ``P`` of the Taylor expansion.

    Returns:
        0-d float32 tensor.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # off-diagonal cos 0
        >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # off-diagonal cos 1
        >>> round(cc_loss(s, t).item(), 4)  # 2 * (1.12 * exp(-0.8))^2 / 4
        0.1266
    """
    if p_order < 0:
        raise ValueError(f"cc_loss: p_order must be >= 0, got {p_order}")
    with _autocast_off(student_emb.device):
        s, t = _flatten_pair(student_emb, teacher_emb, "cc_loss")
        corr_s = _taylor_rbf_correlation(s, gamma, p_order)
        corr_t = _taylor_rbf_correlation(t, gamma, p_order)
        return F.mse_loss(corr_s, corr_t)
