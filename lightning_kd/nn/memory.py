"""A memory bank of per-sample embeddings and the draw of negatives from it, for contrastive distillation.

The bank holds one vector per training sample, refreshed with a momentum average of that sample's embeddings
whenever it appears in a batch and renormalised to unit length (the memory buffer of Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018, as used by CRD, Tian et al., ICLR 2020,
``crd/memory.py`` of the official RepDistiller code).

Under ``torch.distributed`` (DDP) every process calls :meth:`MemoryBank.update` with its own shard of the batch;
the update gathers the embeddings and indices of all processes first and applies the same update everywhere, so
the banks of all processes stay identical. Negatives are drawn by each process for its own samples.

>>> bank = MemoryBank(num_samples=10, dim=4)
>>> bank.update(torch.ones(2, 4), torch.tensor([3, 7]))
>>> round(bank.memory[3].norm().item(), 4)
1.0
>>> sample_negatives(torch.tensor([0, 1]), num_negatives=3, num_samples=10).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: most random keys drawn at once when sampling without replacement (rows are processed in chunks below it)
_MAX_KEYS = 2**24


def gather_across_processes(tensor: Tensor) -> Tensor:
    """``tensor`` of every process concatenated along dimension 0, in rank order (``tensor`` itself outside a
    distributed run). Processes may hold different numbers of rows; every process must call this."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world_size = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)])


def _last_occurrences(index: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct values of ``index`` and, for each, the position of its last occurrence."""
    distinct, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    last = torch.full_like(distinct, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
    return distinct, last


class MemoryBank(nn.Module):
    """``num_samples × dim`` embeddings, one per training sample, in the buffer ``memory`` (saved in checkpoints,
    never optimized).

    Initialised uniformly in ``[-s, s]`` with ``s = 1 / sqrt(dim / 3)`` (rows of expected unit norm), as the
    reference. :meth:`update` sets the row ``i`` of each embedding ``v`` of sample ``i`` to
    ``normalize(momentum · m_i + (1 − momentum) · v)``.

    Args:
        num_samples: number of training samples N (rows).
        dim: embedding size.
        momentum: weight of the stored row in the update (0.5 in CRD).
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5):
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ValueError(f"a memory bank needs num_samples >= 1 and dim >= 1, got {num_samples} and {dim}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory", torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound))

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    @torch.no_grad()
    def update(self, embeddings: Tensor, index: Tensor, sync: bool = True) -> None:
        """Blend ``embeddings`` ``(B, dim)`` into the rows ``index`` ``(B,)`` and renormalise them.

        With ``sync`` (default) the embeddings and indices of all processes are gathered first (a collective:
        every process must call it), so all banks receive the same update. A sample present more than once
        takes its last embedding (in rank order, then batch order).
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or index.shape != embeddings.shape[:1]:
            raise ValueError(f"expected embeddings (B, {self.dim}) and index (B,), got {tuple(embeddings.shape)} "
                             f"and {tuple(index.shape)}")
        embeddings, index = embeddings.detach().to(self.memory.dtype), index.to(self.memory.device, torch.long)
        if sync:
            embeddings, index = gather_across_processes(embeddings), gather_across_processes(index)
        rows, last = _last_occurrences(index)
        blended = self.memory.index_select(0, rows).mul_(self.momentum)
        blended.add_(embeddings[last], alpha=1 - self.momentum)
        blended.div_(blended.pow(2).sum(1, keepdim=True).pow(0.5))
        self.memory.index_copy_(0, rows, blended)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.dim}, momentum={self.momentum}"


def sample_negatives(index: Tensor, num_negatives: int, num_samples: int, targets: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """``(B, num_negatives)`` indices of negatives for the samples ``index`` ``(B,)`` of a set of ``num_samples``.

    Without ``targets``: uniform over all samples but the anchor itself. With ``targets`` ``(num_samples,)``, the
    class of every sample: uniform over the samples of the other classes, as the CIFAR-100 sampler of the CRD
    reference (``CIFAR100InstanceSample``, ``mode='exact'``). Each anchor's negatives are distinct when its pool
    holds at least ``num_negatives`` samples and drawn with replacement otherwise (the reference's rule). Drawn from
    ``generator`` (default: the global generator of ``index``'s device); no host synchronisation.
    """
    batch, device = index.numel(), index.device
    if targets is None:
        order, start, count = None, index, torch.ones_like(index)
    else:
        targets = targets.to(device)
        order = torch.argsort(targets, stable=True)
        sorted_targets = targets[order]
        anchor_targets = targets[index]
        start = torch.searchsorted(sorted_targets, anchor_targets)
        count = torch.searchsorted(sorted_targets, anchor_targets, right=True) - start
    # negatives are the positions 0 .. pool-1 of the sorted samples with the anchor's block [start, start+count) cut out
    pool = num_samples - count
    uniform = torch.rand(batch, num_negatives, device=device, dtype=torch.float64, generator=generator)
    positions = (uniform * pool[:, None]).long()
    width = num_samples - 1
    if num_negatives <= width:
        columns = torch.arange(width, device=device)
        distinct = []
        for chunk in pool.split(max(1, _MAX_KEYS // width)):
            keys = torch.rand(len(chunk), width, device=device, generator=generator)
            keys.masked_fill_(columns >= chunk[:, None], 2.0)
            distinct.append(keys.topk(num_negatives, dim=1, largest=False).indices)
        positions = torch.where((pool >= num_negatives)[:, None], torch.cat(distinct), positions)
    positions = positions + count[:, None] * (positions >= start[:, None])
    return positions if order is None else order[positions]


__all__ = ["MemoryBank", "gather_across_processes", "sample_negatives"]
