"""Image-classification data modules on files: the shared base (seeded validation carve-out, train/eval
transforms, epoch-seeded training order) and :class:`ImageFolderDataModule` for ImageNet-style class folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_kd.data.digits import EpochSeededSampler, split_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_num_workers() -> int:
    """Loader processes when none are asked for: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


class TransformedSubset(Dataset):
    """Items ``indices`` of ``dataset`` (all when ``None``) with ``transform`` applied to the image, so the
    training and validation parts of one loaded training set get different transforms without loading it twice."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | None, transform: Callable):
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


class ImageClassificationDataModule(L.LightningDataModule):
    """Base of the data modules with an official train/test split of images.

    The test split is the official one. ``val_fraction`` of the training images (chosen with ``split_seed``)
    is held out for validation and seen through the evaluation transform; with ``val_fraction=0`` the test split
    doubles as the validation split. The training order is a permutation drawn from ``shuffle_seed + epoch``.

    A subclass gives ``num_classes``, ``in_chans``, ``train_transform``, ``eval_transform`` and ``load_split``
    (the raw images as PIL images with integer targets), and raises the missing-data error in ``prepare_data``.
    ``num_workers=None`` is ``min(8, cpu count)``; ``pin_memory=None`` pins when CUDA is available.
    """

    num_classes: int
    in_chans = 3

    def __init__(self, data_dir: str = "data", batch_size: int = 64, num_workers: int | None = None,
                 val_fraction: float = 0.0, split_seed: int = 0, shuffle_seed: int = 0,
                 pin_memory: bool | None = None):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        self.save_hyperparameters()
        self.datasets: dict[str, TransformedSubset] = {}

    @property
    def data_dir(self) -> Path:
        return Path(self.hparams.data_dir).expanduser()

    @property
    def num_workers(self) -> int:
        workers = self.hparams.num_workers
        return default_num_workers() if workers is None else workers

    @property
    def pin_memory(self) -> bool:
        pin = self.hparams.pin_memory
        return torch.cuda.is_available() if pin is None else pin

    def train_transform(self) -> Callable:
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        raise NotImplementedError

    def load_split(self, train: bool) -> Dataset:
        """The official training (``train=True``) or test split, yielding ``(PIL image, int target)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.prepare_data()
        train, test = self.load_split(train=True), self.load_split(train=False)
        hp = self.hparams
        val_idx, train_idx = split_indices(len(train), (hp.val_fraction,), hp.split_seed)
        eval_transform = self.eval_transform()
        self.datasets = {"train": TransformedSubset(train, train_idx.tolist(), self.train_transform()),
                         "test": TransformedSubset(test, None, eval_transform)}
        self.datasets["val"] = TransformedSubset(train, val_idx.tolist(), eval_transform) if len(val_idx) \
            else self.datasets["test"]

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.datasets["train"]), self.hparams.shuffle_seed)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class _FolderWithClasses(ImageFolder):
    """An :class:`ImageFolder` whose class indices are given (the training folder's), so a validation folder
    that lacks some classes still labels the others as training does."""

    def __init__(self, root: Path, classes: list[str], transform: Callable | None = None):
        self.given_classes = classes
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.given_classes, {name: i for i, name in enumerate(self.given_classes)}


class ImageFolderDataModule(ImageClassificationDataModule):
    """ImageNet-style folders: ``<data_dir>/<train_dir>/<class>/*.JPEG`` and ``<data_dir>/<val_dir>/<class>/*``.

    The class folders of ``train_dir`` (sorted) are the classes, so ``num_classes`` is known once the module is
    built. The ``val_dir`` folder is the test split (and the validation split when ``val_fraction=0``); its
    class folders must be among the training ones. Training: RandomResizedCrop(``image_size``) + horizontal flip;
    evaluation: Resize(``image_size / 0.875``, 256 for 224) + CenterCrop(``image_size``); ImageNet mean/std.
    """

    def __init__(self, data_dir: str = "data/imagenet", batch_size: int = 256, num_workers: int | None = None,
                 image_size: int = 224, train_dir: str = "train", val_dir: str = "val", val_fraction: float = 0.0,
                 split_seed: int = 0, shuffle_seed: int = 0, pin_memory: bool | None = None):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         split_seed=split_seed, shuffle_seed=shuffle_seed, pin_memory=pin_memory)
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        """The class folder names of the training folder, in label order."""
        if self._classes is None:
            self.prepare_data()
            self._classes = find_classes(self.data_dir / self.hparams.train_dir)[0]
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        folders = [self.data_dir / self.hparams.train_dir, self.data_dir / self.hparams.val_dir]
        missing = [str(f) for f in folders if not f.is_dir() or not any(p.is_dir() for p in f.iterdir())]
        if missing:
            raise FileNotFoundError(
                f"ImageFolderDataModule: no class folders in {' and '.join(missing)}. Expected one folder per class "
                f"with its images in each of {folders[0]}/<class>/ and {folders[1]}/<class>/ (for ImageNet: extract "
                "ILSVRC2012_img_train.tar into train/ and sort the validation images into val/<wnid>/ folders).")

    def train_transform(self) -> Callable:
        return transforms.Compose([transforms.RandomResizedCrop(self.hparams.image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def eval_transform(self) -> Callable:
        size = self.hparams.image_size
        return transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size),
                                   transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def load_split(self, train: bool) -> Dataset:
        if train:
            return _FolderWithClasses(self.data_dir / self.hparams.train_dir, self.classes)
        folder = self.data_dir / self.hparams.val_dir
        unknown = sorted(set(find_classes(folder)[0]) - set(self.classes))
        if unknown:
            raise ValueError(f"{folder} has class folders that {self.data_dir / self.hparams.train_dir} lacks: "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        return _FolderWithClasses(folder, self.classes)
