"""A weak and a strong view of every training sample, as Multi-Level Logit Distillation trains on (Jin et al.,
"Multi-Level Logit Distillation", CVPR 2023).

:class:`StrongViewDataModule` wraps an image data module: each training item becomes
``{"input": weak view, "target": label, "index": i, "views": {"strong": strong view}}``, the weak view being the
wrapped module's own training transform and the strong view :func:`strong_transform` of the same raw image
(:class:`~lightning_kd.methods.base.DistillationModule` reads the dict into ``Batch.views``). Validation and test
batches are the wrapped module's.

The strong augmentation is the one of the official code (``get_cifar100_train_transform_strong`` in
``mdistiller/dataset/cifar100.py`` of ``Jin-Ying/Multi-Level-Logit-Distillation``): random crop with 4 pixels of
padding and horizontal flip, drawn independently of the weak view's, then :class:`FixMatchRandAugment` (2 operations
and a Cutout), then the wrapped module's normalisation.

>>> import torch
>>> from PIL import Image
>>> image = Image.new("RGB", (32, 32), (200, 40, 90))
>>> view = strong_transform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(image)
>>> view.shape, view.dtype
(torch.Size([3, 32, 32]), torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from lightning_kd.data.base import TransformedSubset, WrapperDataModule

#: the Cutout patch's colour in the official code (an RGB grey near the CIFAR mean)
CUTOUT_FILL = (125, 123, 114)


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients)


#: (name, operation(image, v), low, high): v is drawn uniformly from [low, high]
OPERATIONS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    ("auto_contrast", lambda image, v: ImageOps.autocontrast(image), 0.0, 1.0),
    ("brightness", lambda image, v: ImageEnhance.Brightness(image).enhance(v), 0.05, 0.95),
    ("color", lambda image, v: ImageEnhance.Color(image).enhance(v), 0.05, 0.95),
    ("contrast", lambda image, v: ImageEnhance.Contrast(image).enhance(v), 0.05, 0.95),
    ("equalize", lambda image, v: ImageOps.equalize(image), 0.0, 1.0),
    ("identity", lambda image, v: image, 0.0, 1.0),
    ("posterize", lambda image, v: ImageOps.posterize(image, max(1, int(v))), 4.0, 8.0),
    ("rotate", lambda image, v: image.rotate(v), -30.0, 30.0),
    ("sharpness", lambda image, v: ImageEnhance.Sharpness(image).enhance(v), 0.05, 0.95),
    ("shear_x", lambda image, v: _affine(image, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("shear_y", lambda image, v: _affine(image, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("solarize", lambda image, v: ImageOps.solarize(image, v), 0.0, 256.0),
    ("translate_x", lambda image, v: _affine(image, (1, 0, v * image.size[0], 0, 1, 0)), -0.3, 0.3),
    ("translate_y", lambda image, v: _affine(image, (1, 0, 0, 0, 1, v * image.size[1])), -0.3, 0.3),
)


def cutout(image: Image.Image, fraction: float, center: tuple[float, float]) -> Image.Image:
    """A copy of ``image`` with a square of side ``fraction`` × width at ``center`` (clipped to the image) filled
    with :data:`CUTOUT_FILL`; ``image`` itself when ``fraction`` is 0."""
    if fraction <= 0:
        return image
    side = fraction * image.size[0]
    left, top = int(max(0.0, center[0] - side / 2)), int(max(0.0, center[1] - side / 2))
    right, bottom = min(image.size[0], left + side), min(image.size[1], top + side)
    fill = CUTOUT_FILL if image.mode == "RGB" else round(sum(CUTOUT_FILL) / 3)
    image = image.copy()
    ImageDraw.Draw(image).rectangle((left, top, right, bottom), fill=fill)
    return image


class FixMatchRandAugment:
    """The RandAugment variant of the official MLKD code (taken there from FixMatch implementations): ``num_ops``
    operations drawn with replacement from the 14 of :data:`OPERATIONS`, each at a magnitude drawn uniformly from
    its range, then a Cutout of a square of side uniform in ``[0, max_cutout]`` × width at a uniform position.

    The official ``RandAugment(2, 10)`` ignores its magnitude 10 (the magnitudes are random); its Cutout centre is
    drawn from ``np.random.uniform(w)``, i.e. from ``(1, w]``, here from ``[0, w)``. Random numbers come from torch,
    which seeds every loader process.
    """

    def __init__(self, num_ops: int = 2, max_cutout: float = 0.5):
        if num_ops < 0 or not 0.0 <= max_cutout <= 1.0:
            raise ValueError(f"num_ops must be >= 0 and max_cutout in [0, 1], got {num_ops} and {max_cutout}")
        self.num_ops, self.max_cutout = num_ops, max_cutout

    def __call__(self, image: Image.Image) -> Image.Image:
        for choice in torch.randint(len(OPERATIONS), (self.num_ops,)).tolist():
            _, operation, low, high = OPERATIONS[choice]
            image = operation(image, low + (high - low) * torch.rand(()).item())
        fraction, x, y = torch.rand(3).tolist()
        return cutout(image, fraction * self.max_cutout, (x * image.size[0], y * image.size[1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, max_cutout={self.max_cutout})"


class PadCrop:
    """A random crop of an image's own size from it padded by ``padding`` zero pixels (``RandomCrop(32,
    padding=4)`` on CIFAR)."""

    def __init__(self, padding: int = 4):
        self.padding = padding

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        padded = TF.pad(image, self.padding)
        top, left, _, _ = transforms.RandomCrop.get_params(padded, (height, width))
        return TF.crop(padded, top, left, height, width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding})"


def strong_transform(mean: Sequence[float], std: Sequence[float], num_ops: int = 2) -> Callable:
    """The official strong view of a PIL image: pad-4 random crop, horizontal flip, :class:`FixMatchRandAugment`
    with ``num_ops`` operations, then a float tensor normalised with ``mean`` and ``std``."""
    return transforms.Compose([PadCrop(4), transforms.RandomHorizontalFlip(), FixMatchRandAugment(num_ops),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


class StrongViewDataset(Dataset):
    """The items of ``subset`` (a :class:`~lightning_kd.data.base.TransformedSubset`, its transform giving the weak
    view) as ``{"input": weak, "target": label, "index": i, "views": {"strong": strong_transform(image)}}``, both
    views made from the same raw image."""

    def __init__(self, subset: TransformedSubset, strong: Callable):
        self.subset, self.strong = subset, strong

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.subset.dataset[self.subset.indices[index]]
        return {"input": self.subset.transform(image), "target": target, "index": index,
                "views": {"strong": self.strong(image)}}


class StrongViewDataModule(WrapperDataModule):
    """``datamodule`` whose training items also carry a strong view of each sample (see the module's docstring):
    training batches are dicts ``{"input", "target", "index", "views": {"strong"}}``; validation and test are
    unchanged.

    The wrapped module must keep its training split as a :class:`~lightning_kd.data.base.TransformedSubset` of PIL
    images in ``datasets["train"]`` (every :class:`~lightning_kd.data.ImageClassificationDataModule` without
    ``device_resident``) and give its normalisation as ``mean`` and ``std``. The strong augmentation is the
    official CIFAR one (a crop at the image's own size), meant for data sets of small images of one size. From the
    command line::

        --data lightning_kd.data.views.StrongViewDataModule --data.datamodule lightning_kd.data.CIFAR100DataModule

    Args:
        datamodule: the image data module whose training split gets the strong views.
        num_ops: operations of :class:`FixMatchRandAugment` per strong view (official: 2).
    """

    def __init__(self, datamodule: L.LightningDataModule, num_ops: int = 2):
        super().__init__(datamodule)
        self.save_hyperparameters(ignore=["datamodule"])
        if getattr(datamodule, "hparams", {}).get("device_resident"):
            raise ValueError(f"{type(datamodule).__name__} has device_resident=True, which augments whole batches on "
                             "the accelerator, but the strong view needs the per-sample pipeline of PIL images: set "
                             "device_resident=False")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        datasets = getattr(self.datamodule, "datasets", None)
        train = datasets.get("train") if isinstance(datasets, dict) else None
        if isinstance(train, StrongViewDataset):
            return
        name = type(self.datamodule).__name__
        if not isinstance(train, TransformedSubset):
            raise ValueError(f"StrongViewDataModule makes the strong view from each raw PIL image, so it needs a "
                             "data module that keeps its training split as a TransformedSubset in datasets['train'] "
                             f"(as the image data modules without device_resident do); {name} keeps "
                             f"{type(train).__name__}: wrap an image data module such as CIFAR100DataModule")
        mean, std = getattr(self.datamodule, "mean", None), getattr(self.datamodule, "std", None)
        if mean is None or std is None:
            raise ValueError(f"{name} gives no `mean` and `std` to normalise the strong view with: add them as "
                             "attributes of the data module")
        datasets["train"] = StrongViewDataset(train, strong_transform(mean, std, self.hparams.num_ops))


__all__ = ["FixMatchRandAugment", "PadCrop", "StrongViewDataModule", "StrongViewDataset", "cutout",
           "strong_transform"]
