"""Losses of online (mutual) distillation, where peers trained together from scratch teach each other.

Same conventions as :mod:`lightning_kd.losses.logit`: raw ``(B, C)`` logits, float32 results with autocast
disabled. The peers that act as teachers are targets, never trained through these losses: their logits are
detached here.

Implemented:

* :func:`dml_loss`, :func:`mutual_learning_losses` -- Deep Mutual Learning, Zhang et al., CVPR 2018.
* :func:`min_logit_ensemble`, :func:`mean_logit_ensemble` -- the online ensemble teachers of KDCL, Guo et al.,
  CVPR 2020 (MinLogit) and of ONE-style online ensembles (Lan et al., NeurIPS 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kd.losses.logit import TemperatureLike, kd_loss

__all__ = ["dml_loss", "mutual_learning_losses", "min_logit_ensemble", "mean_logit_ensemble"]


def _check_peers(peer_logits: Sequence[Tensor]) -> None:
    if len(peer_logits) < 2:
        raise ValueError(f"online distillation needs at least 2 peers, got {len(peer_logits)}")
    shapes = {tuple(logits.shape) for logits in peer_logits}
    if len(shapes) != 1 or peer_logits[0].dim() != 2:
        raise ValueError("every peer's logits must have the same shape (B, C), got "
                         f"{[tuple(logits.shape) for logits in peer_logits]}")


def dml_loss(peer_logits: Tensor, other_logits: Tensor, temperature: TemperatureLike = 1.0) -> Tensor:
    r"""The mutual-learning term of one peer towards another.

    Paper: Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu, "Deep Mutual Learning", CVPR 2018.

    Formula: ``L = T^2 * mean_i KL(softmax(o_i / T) || softmax(p_i / T))`` with ``p`` the peer's and ``o`` the other
    peer's logits; the paper's ``D_KL(p_2 || p_1)`` for peer 1 at ``T = 1``.

    Reduction: KL summed over classes, averaged over the batch ("batchmean"), times ``T^2`` (1 at the paper's
    ``T = 1``), i.e. :func:`lightning_kd.losses.kd_loss` with the other peer as teacher. ``other_logits`` are
    detached: the other peer's distribution is a fixed target here, as in the paper, and gets no gradient.

    Args:
        peer_logits: ``(B, C)`` logits of the peer this term trains.
        other_logits: ``(B, C)`` logits of the peer it learns from.
        temperature: softening temperature (the paper uses 1).

    Returns:
        0-d float32 tensor.

    Example:
        >>> import math
        >>> round(dml_loss(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, math.log(4.0)]])).item(), 4)  # ln(2) / 3
        0.231
    """
    return kd_loss(peer_logits, other_logits.detach(), temperature)


def mutual_learning_losses(peer_logits: Sequence[Tensor], temperature: TemperatureLike = 1.0) -> list[Tensor]:
    r"""Each peer's mutual-learning term in a cohort of ``K >= 2`` peers (Zhang et al., CVPR 2018).

    Formula: ``L_k = 1 / (K - 1) * sum_{l != k} dml_loss(z_k, z_l)``: the mean KL from every other peer's
    distribution to peer ``k``'s (the KL weight of the paper, ``1 / (K - 1)``, keeps the term's scale
    independent of the cohort size).

    Reduction: that of :func:`dml_loss` (batchmean, times ``T^2``). Term ``k`` has gradients only into
    ``peer_logits[k]``.

    Args:
        peer_logits: the ``K`` peers' ``(B, C)`` logits.
        temperature: softening temperature (the paper uses 1).

    Returns:
        ``K`` 0-d float32 tensors, one per peer, in order.

    Example:
        >>> import math
        >>> z = [torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])]  # p1 = (1/2, 1/2), p2 = (1/4, 3/4)
        >>> [round(v.item(), 4) for v in mutual_learning_losses(z)]  # KL(p2 || p1), KL(p1 || p2)
        [0.1308, 0.1438]
    """
    _check_peers(peer_logits)
    others = len(peer_logits) - 1
    return [sum(dml_loss(logits, other, temperature) for j, other in enumerate(peer_logits) if j != k) / others
            for k, logits in enumerate(peer_logits)]


def min_logit_ensemble(peer_logits: Sequence[Tensor], target: Tensor) -> Tensor:
    r"""KDCL-MinLogit: the ensemble teacher's logits from the peers' logits and the labels.

    Paper: Q. Guo, X. Wang, Y. Wu, Z. Yu, D. Liang, X. Hu, P. Luo, "Online Knowledge Distillation via
    Collaborative Learning", CVPR 2020.

    Formula: ``t_c = min_k (z_{k,c} - z_{k,y})`` for every class ``c``, ``y`` the label: each peer's logits are
    shifted so that the label's logit is 0 and the teacher takes, class by class, the smallest shifted logit,
    i.e. the largest margin any peer gives the label over class ``c``. ``t_y = 0``.

    No reduction (per sample and class). Not detached: detach the peers' logits first when the result is a
    target.

    Args:
        peer_logits: the ``K >= 2`` peers' ``(B, C)`` logits.
        target: ``(B,)`` integer labels.

    Returns:
        ``(B, C)`` float32 teacher logits.

    Example:
        >>> z = [torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 1.0]])]
        >>> min_logit_ensemble(z, torch.tensor([0])).tolist()
        [[0.0, -1.0, -2.0]]
    """
    _check_peers(peer_logits)
    stacked = torch.stack([logits.float() for logits in peer_logits])
    index = target.reshape(1, -1, 1).to(device=stacked.device, dtype=torch.long).expand(len(peer_logits), -1, 1)
    return (stacked - stacked.gather(2, index)).amin(dim=0)


def mean_logit_ensemble(peer_logits: Sequence[Tensor]) -> Tensor:
    r"""The plain online ensemble teacher: the peers' mean logits, ``t = 1 / K * sum_k z_k``.

    The label-free ensemble of online distillation (the logit-level ensemble of ONE, Lan et al., "Knowledge
    Distillation by On-the-Fly Native Ensemble", NeurIPS 2018, with equal weights instead of a learned gate).
    No reduction; not detached.

    Args:
        peer_logits: the ``K >= 2`` peers' ``(B, C)`` logits.

    Returns:
        ``(B, C)`` float32 teacher logits.

    Example:
        >>> mean_logit_ensemble([torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 1.0]])]).tolist()
        [[1.0, 2.0, 0.5]]
    """
    _check_peers(peer_logits)
    return torch.stack([logits.float() for logits in peer_logits]).mean(dim=0)
