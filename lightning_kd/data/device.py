"""Small image data sets kept whole on the accelerator as uint8, augmented and normalised per batch on the device.

Random crop with zero padding, horizontal flip and normalisation are one gather and one multiply-add per batch, with
the distribution of torchvision's ``RandomCrop(size, padding) → RandomHorizontalFlip() → ToTensor() → Normalize``:
each view's crop offset (uniform over the ``2·padding + 1`` positions per axis) and flip (probability ½) are drawn
from ``(seed, epoch)`` for the whole data set at once, so the view of sample ``i`` at epoch ``e`` is a function of
``(seed, e, i)`` alone — the order of the batches, the batch size, the device and resumption do not change it. That
is what lets a teacher's outputs for those exact views be computed once and replayed
(:class:`lightning_kd.cache.TeacherOutputCache`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """Random crop of the image's own size after zero ``padding`` on every side, and a horizontal ``flip`` with
    probability ½; ``padding=0`` and ``flip=False`` leave the image as it is."""

    padding: int = 0
    flip: bool = False

    @property
    def random(self) -> bool:
        return self.padding > 0 or self.flip


def view_params(augmentation: Augmentation, num_samples: int, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
    """Crop offsets ``(num_samples, 2)`` (row, column; in ``[0, 2·padding]``) and flips ``(num_samples,)`` of every
    sample's view at ``epoch``, drawn on the CPU from ``(seed, epoch)`` so that every device gets the same views."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offsets = torch.randint(0, 2 * augmentation.padding + 1, (num_samples, 2), generator=generator)
    flips = torch.rand(num_samples, generator=generator) < 0.5 if augmentation.flip else \
        torch.zeros(num_samples, dtype=torch.bool)
    return offsets, flips


def augment_batch(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Crop ``images`` (uint8 ``B×C×H×W``) at ``offsets`` from their zero-padded copies and flip the rows of
    ``flips`` horizontally, in one gather; the result has the input's size and dtype."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def normalization(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``scale, offset`` (``1×C×1×1``) with ``image · scale + offset = (image / 255 − mean) / std``."""
    mean_, std_ = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    return (1.0 / (255.0 * std_)).float().to(device), (-mean_ / std_).float().to(device)


def normalize_batch(images: Tensor, scale: Tensor, offset: Tensor,
                    memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``(images / 255 − mean) / std`` in float32 from uint8 ``B×C×H×W``, as ``ToTensor`` then ``Normalize``, with
    ``scale, offset`` from :func:`normalization` (built once, on the images' device: no copy per batch)."""
    return torch.addcmul(offset, images.float(), scale).contiguous(memory_format=memory_format)


class DeviceBatches:
    """Batches ``(images, targets, indices)`` over uint8 ``images`` and integer ``targets`` that stay on their
    device: each epoch's order is a permutation drawn from ``(seed, epoch)`` when ``shuffle``, views are augmented
    per :func:`view_params` and normalised on the device.

    Lightning calls ``sampler.set_epoch`` at every epoch start, as for a ``DataLoader``. Under DDP each of the
    ``num_replicas`` processes takes every ``num_replicas``-th sample of the epoch's order starting at ``rank``;
    training drops the incomplete tail so that every process runs the same number of steps.
    """

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], augmentation: Augmentation = Augmentation(), shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, num_replicas: int = 1,
                 channels_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {images.dtype} of shape {tuple(images.shape)}")
        self.images, self.targets = images, targets
        self.batch_size, self.mean, self.std = batch_size, tuple(mean), tuple(std)
        self.scale, self.offset = normalization(mean, std, images.device)
        self.augmentation, self.shuffle, self.seed, self.drop_last = augmentation, shuffle, seed, drop_last
        self.rank, self.num_replicas = rank, num_replicas
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        self._params_cache: tuple[int, Tensor, Tensor] | None = None

    batch_sampler = None

    def to(self, device: torch.device | str) -> DeviceBatches:
        """Move the images, targets and normalisation to ``device`` (in place) and return ``self``."""
        self.images, self.targets = self.images.to(device), self.targets.to(device)
        self.scale, self.offset = self.scale.to(device), self.offset.to(device)
        self._params_cache = None
        return self

    @property
    def sampler(self) -> DeviceBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        count = len(range(self.rank, self._usable(), self.num_replicas))  # this process's samples
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def _usable(self) -> int:
        """Samples shared out between the processes: all, or under ``drop_last`` a multiple of their number."""
        count = len(self.targets)
        return count - count % self.num_replicas if self.drop_last else count

    def _indices(self) -> Tensor:
        count = len(self.targets)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self.epoch)) \
            if self.shuffle else torch.arange(count)
        return order[self.rank:self._usable():self.num_replicas]

    def views(self, indices: Tensor, epoch: int | None = None) -> Tensor:
        """The normalised views of samples ``indices`` at ``epoch`` (default: the current one)."""
        device = self.images.device
        indices = indices.to(device)
        images = self.images.index_select(0, indices)
        if self.augmentation.random:
            offsets, flips = self._params(self.epoch if epoch is None else epoch)
            images = augment_batch(images, offsets.index_select(0, indices), flips.index_select(0, indices),
                                   self.augmentation.padding)
        return normalize_batch(images, self.scale, self.offset, self.memory_format)

    def _params(self, epoch: int) -> tuple[Tensor, Tensor]:
        cached = self._params_cache
        if cached is None or cached[0] != epoch:
            offsets, flips = view_params(self.augmentation, len(self.targets), self.seed, epoch)
            cached = (epoch, offsets.to(self.images.device), flips.to(self.images.device))
            self._params_cache = cached
        return cached[1], cached[2]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._indices().to(self.images.device)
        stop = len(self) * self.batch_size
        for start in range(0, stop, self.batch_size):
            indices = order[start:min(start + self.batch_size, len(order))]
            yield self.views(indices), self.targets.index_select(0, indices), indices
