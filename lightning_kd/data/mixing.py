"""Batch-level mixup and CutMix on the device, for consistent teaching: one mixed view that the teacher and the
student both see (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022).

Each function takes the images already on their device, mixes each image with a partner from the same batch with
one coefficient for the whole batch, and returns the mixed images and a :class:`Mixing` that says how. The random
numbers (the coefficient, the CutMix box) are drawn on the host, so nothing waits for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIX_MODES = ("mixup", "cutmix")


@dataclass(frozen=True)
class Mixing:
    """How a batch was mixed: output ``i`` holds the share ``lam`` of image ``i`` and ``1 - lam`` of image
    ``partner[i]`` (mixup: pixel weights; CutMix: area, the partner's pixels filling ``box``)."""

    lam: float
    partner: Tensor
    #: CutMix's pasted rectangle as ``(top, left, height, width)``; ``None`` for mixup
    box: tuple[int, int, int, int] | None = None

    def mix_targets(self, target: Tensor, num_classes: int) -> Tensor:
        """The mixed labels ``lam · onehot(y) + (1 - lam) · onehot(y[partner])``, ``(B, num_classes)`` float32."""
        # scatter rather than F.one_hot, whose range check waits for the device
        soft = torch.zeros(target.shape[0], num_classes, device=target.device)
        soft.scatter_(1, target.view(-1, 1), self.lam)
        return soft.scatter_add_(1, target[self.partner].view(-1, 1), torch.full_like(soft[:, :1], 1.0 - self.lam))


def sample_lambda(alpha: float = 1.0, generator: torch.Generator | None = None) -> float:
    """One draw of ``λ ~ Beta(α, α)`` as ``X / (X + Y)`` with ``X, Y ~ Gamma(α)``, from ``generator`` (CPU) or the
    global torch generator."""
    if not alpha > 0:
        raise ValueError(f"the mixing concentration alpha must be positive, got {alpha}")
    gammas = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    total = float(gammas.sum())
    return float(gammas[0]) / total if total > 0 else 1.0  # both underflow only for tiny alpha


def default_partner(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Each image's partner is the previous one in the batch (``roll`` by one, as in big_vision's mixup)."""
    return torch.arange(batch_size, device=device).roll(1)


def _prepare(images: Tensor, lam: float | None, alpha: float, partner: Tensor | None,
             generator: torch.Generator | None) -> tuple[float, Tensor]:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if lam is None:
        lam = sample_lambda(alpha, generator)
        lam = max(lam, 1.0 - lam)
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"the mixing coefficient lam must lie in [0, 1], got {lam}")
    partner = default_partner(images.shape[0], images.device) if partner is None else partner.to(images.device)
    return float(lam), partner


def mixup(images: Tensor, lam: float | None = None, *, alpha: float = 1.0, partner: Tensor | None = None,
          generator: torch.Generator | None = None) -> tuple[Tensor, Mixing]:
    """Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) with one coefficient per batch.

    ``x̃_i = λ · x_i + (1 − λ) · x_partner[i]``. Without ``lam``, ``λ ~ Beta(α, α)`` folded to ``max(λ, 1 − λ)``
    so that every output keeps the larger share of its own image, as big_vision sorts its Dirichlet draw; the
    default ``α = 1`` (λ uniform) is the function-matching setting of Beyer et al. (big_vision
    ``configs/proj/distill``: ``mixup = dict(p=1.0, n=2)``).

    Args:
        images: ``(B, C, H, W)`` images on any device.
        lam: the coefficient; ``None``: drawn as above.
        alpha: concentration α of the Beta distribution.
        partner: ``(B,)`` index of each image's partner; ``None``: the previous image (:func:`default_partner`).
        generator: CPU generator for λ; ``None``: the global one (seeded by ``seed_everything``).

    Returns:
        The mixed images (same shape, device and dtype) and the :class:`Mixing`.
    """
    lam, partner = _prepare(images, lam, alpha, partner, generator)
    return torch.lerp(images[partner], images, lam), Mixing(lam, partner)


def cutmix_box(height: int, width: int, lam: float,
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """CutMix's rectangle for coefficient ``lam``: sides ``⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋`` around a uniformly drawn
    centre, clipped to the image (Yun et al., ICCV 2019, official ``rand_bbox``). Returns ``(top, left, height,
    width)``."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = (int(torch.randint(n, (), generator=generator)) for n in (height, width))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, left, bottom - top, right - left


def cutmix(images: Tensor, lam: float | None = None, *, alpha: float = 1.0, partner: Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, Mixing]:
    """CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
    Features", ICCV 2019) with one box per batch.

    The partner's pixels fill the rectangle of :func:`cutmix_box`; the returned ``Mixing.lam`` is the area share
    that each image keeps, ``1 − box area / (H·W)``, as in the official code. Without ``lam``, ``λ ~ Beta(α, α)``
    (α = 1, the paper's CIFAR and ImageNet setting) folded to ``max(λ, 1 − λ)``, so the box covers at most half
    of the image.

    Args:
        images: ``(B, C, H, W)`` images on any device.
        lam: the coefficient that sizes the box; ``None``: drawn as above.
        alpha: concentration α of the Beta distribution.
        partner: ``(B,)`` index of each image's partner; ``None``: the previous image (:func:`default_partner`).
        generator: CPU generator for λ and the box centre; ``None``: the global one.

    Returns:
        The mixed images (a new tensor) and the :class:`Mixing` with the box.
    """
    lam, partner = _prepare(images, lam, alpha, partner, generator)
    height, width = images.shape[-2:]
    top, left, box_h, box_w = box = cutmix_box(height, width, lam, generator)
    mixed = images.clone()
    window = (..., slice(top, top + box_h), slice(left, left + box_w))
    mixed[window] = images[window][partner]
    return mixed, Mixing(1.0 - box_h * box_w / (height * width), partner, box)


def mix_images(images: Tensor, mode: str, alpha: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Mixing]:
    """:func:`mixup` or :func:`cutmix` by name (``mode`` in :data:`MIX_MODES`)."""
    if mode == "mixup":
        return mixup(images, alpha=alpha, generator=generator)
    if mode == "cutmix":
        return cutmix(images, alpha=alpha, generator=generator)
    raise ValueError(f"unknown mix mode {mode!r}: use one of {', '.join(MIX_MODES)}")


__all__ = ["MIX_MODES", "Mixing", "cutmix", "cutmix_box", "default_partner", "mix_images", "mixup", "sample_lambda"]
