""":class:`ImageFolderDataModule` for ImageNet-style class folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_kd.data.base import ImageClassificationDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
