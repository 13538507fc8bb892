"""MNIST (LeCun et al., 1998) and Fashion-MNIST (Xiao et al., 2017) from torchvision's IDX files: 1×28×28 images,
10 classes, 60,000 training and 10,000 test images."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from lightning_kd.data.base import ImageClassificationDataModule
from lightning_kd.data.device import Augmentation


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST read by torchvision from ``<data_dir>/MNIST/raw/`` (``train-images-idx3-ubyte`` and the other three
    IDX files).

    Each file is taken from there, else from its ``.gz`` there, else from ``source_dir`` (the file or its ``.gz``,
    e.g. a distribution's data package), else downloaded when ``download=True``. A ``.gz`` is decompressed into the
    raw folder here rather than by torchvision, which only extracts what it downloaded and checksummed itself.
    Normalised with the training set's mean and std; ``augment`` adds RandomCrop(28, padding=2) (and a horizontal
    flip for Fashion-MNIST) to training. See :class:`ImageClassificationDataModule` for the splits and seeds, and
    ``device_resident``, which keeps the uint8 images on the accelerator and augments each batch there.
    """

    num_classes = 10
    in_chans = 1
    dataset_class = datasets.MNIST
    display_name = "MNIST"
    mean = (0.1307,)
    std = (0.3081,)
    flip = False
    offline_hint = ""

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int | None = None,
                 download: bool = False, source_dir: str | None = None, augment: bool = False,
                 val_fraction: float = 0.0, split_seed: int = 0, shuffle_seed: int = 0,
                 pin_memory: bool | None = None, device_resident: bool = False):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         split_seed=split_seed, shuffle_seed=shuffle_seed, pin_memory=pin_memory,
                         device_resident=device_resident)

    @property
    def raw_folder(self) -> Path:
        """Where torchvision reads the files: ``<data_dir>/<dataset class name>/raw``."""
        return self.data_dir / self.dataset_class.__name__ / "raw"

    @property
    def file_names(self) -> list[str]:
        return [name.removesuffix(".gz") for name, _ in self.dataset_class.resources]

    def missing_files(self) -> list[str]:
        return [name for name in self.file_names if not (self.raw_folder / name).is_file()]

    def prepare_data(self) -> None:
        sources = [self.raw_folder]
        if self.hparams.source_dir is not None:
            sources.append(Path(self.hparams.source_dir).expanduser())
        for name in self.missing_files():
            self._stage(name, sources)
        if self.hparams.download and self.missing_files():
            self.dataset_class(str(self.data_dir), train=True, download=True)
        missing = self.missing_files()
        if missing:
            looked_in = " or ".join(str(s) for s in sources)
            raise FileNotFoundError(
                f"{self.display_name} not found: {', '.join(missing)} (or the same with .gz) missing from "
                f"{looked_in}. Pass download=True, copy the four IDX files (.gz or decompressed) into "
                f"{self.raw_folder}, or point source_dir at a folder that holds them{self.offline_hint}.")

    def _stage(self, name: str, sources: list[Path]) -> None:
        """Put ``name`` into the raw folder from the first source holding it or its ``.gz`` (written under a
        temporary name and renamed, so a concurrent reader never sees half a file)."""
        target = self.raw_folder / name
        for source in sources:
            if source != self.raw_folder and (source / name).is_file():
                opener = open
                path = source / name
            elif (source / f"{name}.gz").is_file():
                opener = gzip.open
                path = source / f"{name}.gz"
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{name}.{os.getpid()}.part")
            with opener(path, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
            return

    def load_split(self, train: bool) -> Dataset:
        return self.dataset_class(str(self.data_dir), train=train, download=False)

    def train_transform(self) -> Callable:
        steps = []
        if self.hparams.augment:
            steps.append(transforms.RandomCrop(28, padding=2))
            if self.flip:
                steps.append(transforms.RandomHorizontalFlip())
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def augmentation(self) -> Augmentation:
        return Augmentation(padding=2, flip=self.flip) if self.hparams.augment else Augmentation()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST read from ``<data_dir>/FashionMNIST/raw/``; otherwise as :class:`MNISTDataModule`.

    Offline with Debian's ``dataset-fashion-mnist`` package::

        FashionMNISTDataModule(data_dir="data", source_dir="/usr/share/datasets/fashion-mnist")

    (its ``.gz`` files are recompressed, so their MD5 differs from torchvision's table and ``download=True``
    would not accept them; they are decompressed into the raw folder instead).
    """

    dataset_class = datasets.FashionMNIST
    display_name = "Fashion-MNIST"
    mean = (0.2860,)
    std = (0.3530,)
    flip = True
    offline_hint = (" (on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
                    "/usr/share/datasets/fashion-mnist)")
