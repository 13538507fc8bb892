"""Lightning data modules. Each exposes ``num_classes`` and ``in_chans`` (linked to the model by the CLI)."""

from lightning_kd.data.base import EpochSeededSampler, ImageClassificationDataModule, SplitDataModule, split_indices
from lightning_kd.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_kd.data.digits import DigitsDataModule
from lightning_kd.data.imagefolder import ImageFolderDataModule
from lightning_kd.data.indexed import IndexedDataModule, IndexedDataset
from lightning_kd.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lightning_kd.data.onpolicy import choose_source, generate_continuations
from lightning_kd.data.synthetic import DataFreeDataModule, SampleIndices
from lightning_kd.data.text import TextDataModule
from lightning_kd.data.views import StrongViewDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataFreeDataModule",
    "DigitsDataModule",
    "EpochSeededSampler",
    "FashionMNISTDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "IndexedDataModule",
    "IndexedDataset",
    "MNISTDataModule",
    "SampleIndices",
    "SplitDataModule",
    "StrongViewDataModule",
    "split_indices",
    "TextDataModule",
    "choose_source",
    "generate_continuations",
]
