"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from torchvision's python-pickle files, with the standard CIFAR KD
recipe: RandomCrop(32, padding=4) + horizontal flip for training, the official 10,000-image test split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import extract_archive

from lightning_kd.data.base import ImageClassificationDataModule
from lightning_kd.data.device import Augmentation


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 3×32×32 images, 10 classes, read from
    ``<data_dir>/cifar-10-batches-py``.

    The files are taken from there, else extracted from ``<data_dir>/cifar-10-python.tar.gz``, else downloaded when
    ``download=True``. torchvision checks every file's MD5 against the official release when loading. Normalised
    with the training set's per-channel mean and std. See :class:`ImageClassificationDataModule` for the splits
    and seeds; ``batch_size=64`` is the CIFAR KD recipe's (CRD, DKD). ``device_resident=True`` keeps the 150 MB of
    uint8 images on the accelerator and crops, flips and normalises each batch there.
    """

    num_classes = 10
    in_chans = 3
    dataset_class = datasets.CIFAR10
    display_name = "CIFAR-10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir: str = "data", batch_size: int = 64, num_workers: int | None = None,
                 download: bool = False, val_fraction: float = 0.0, split_seed: int = 0, shuffle_seed: int = 0,
                 pin_memory: bool | None = None, device_resident: bool = False):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         split_seed=split_seed, shuffle_seed=shuffle_seed, pin_memory=pin_memory,
                         device_resident=device_resident)

    @property
    def folder(self) -> Path:
        return self.data_dir / self.dataset_class.base_folder

    def missing_files(self) -> list[str]:
        cls = self.dataset_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [name for name in names if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        archive = self.data_dir / self.dataset_class.filename
        if self.hparams.download:
            # torchvision downloads (or reuses a matching archive in data_dir) unless the files pass its MD5 check
            self.dataset_class(str(self.data_dir), train=False, download=True)
        elif self.missing_files() and archive.is_file():
            extract_archive(str(archive), str(self.data_dir))
        missing = self.missing_files()
        if missing:
            url = self.dataset_class.url
            raise FileNotFoundError(
                f"{self.display_name} not found: {self.folder} lacks {', '.join(missing)}. Pass download=True to fetch "
                f"{url}, or put the python version there yourself: copy {Path(url).name} into {self.data_dir} "
                f"(it is extracted on first use) or extract it so that {self.folder}/ holds the files.")

    def load_split(self, train: bool) -> Dataset:
        # torchvision's CIFAR constructor runs `_check_integrity`: it compares the MD5 of every batch file (and of
        # the meta file in `_load_meta`) with the official release's and raises a bare RuntimeError on a mismatch.
        # `prepare_data` has already said which files are absent, so a failure here means changed files.
        try:
            return self.dataset_class(str(self.data_dir), train=train, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.folder} holds files that differ from the official {self.display_name} release (torchvision "
                f"checks their MD5): {error}. Remove the folder and pass download=True, or re-extract "
                f"{self.dataset_class.filename}.") from error

    def train_transform(self) -> Callable:
        return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def augmentation(self) -> Augmentation:
        return Augmentation(padding=4, flip=True)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 training and 10,000 test 3×32×32 images, 100 fine classes, read from
    ``<data_dir>/cifar-100-python`` (or ``cifar-100-python.tar.gz``); otherwise as :class:`CIFAR10DataModule`."""

    num_classes = 100
    dataset_class = datasets.CIFAR100
    display_name = "CIFAR-100"
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
