"""Training batches that carry each sample's index, for methods that keep per-sample state (CRD's memory bank).

:class:`IndexedDataset` turns ``(input, target)`` items into ``(input, target, index)``;
:class:`IndexedDataModule` applies it to the training split of a data module (validation and test batches are
unchanged). :func:`dataset_targets` reads the class of every sample of a data set without loading its inputs
where the data set allows it.

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> data = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([1, 0, 1])))
>>> data[2][1:]
(tensor(1), 2)
>>> dataset_targets(data)
tensor([1, 0, 1])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_kd.data.base import TransformedSubset, WrapperDataModule


class IndexedDataset(Dataset):
    """``dataset`` whose item ``i`` is ``(input, target, i)`` (a dict item gets the key ``"index"``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, dict):
            return {**item, "index": index}
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[0], item[1], index
        raise TypeError(f"IndexedDataset expects (input, target) items or dicts, got {type(item).__name__}")


def with_indices(dataset: Dataset) -> IndexedDataset:
    """``dataset`` as an :class:`IndexedDataset` (itself when it already is one)."""
    return dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)


def dataset_targets(dataset: Dataset) -> Tensor:
    """The integer class of every item of ``dataset``, as a ``(len(dataset),)`` long tensor.

    Read from ``targets`` (torchvision data sets), the second tensor of a ``TensorDataset``, and through
    ``Subset``/``ConcatDataset``/:class:`IndexedDataset`/the data modules' subsets; any other data set is iterated
    once (loading every item).
    """
    if isinstance(dataset, IndexedDataset):
        return dataset_targets(dataset.dataset)
    if isinstance(dataset, (TransformedSubset, Subset)):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(part) for part in dataset.datasets])
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long()
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return torch.as_tensor(targets, dtype=torch.long)
    items = (dataset[i] for i in range(len(dataset)))
    return torch.tensor([int(item["target"] if isinstance(item, dict) else item[1]) for item in items],
                        dtype=torch.long)


def training_split(datamodule: Any) -> Dataset | None:
    """The training split of a data module that keeps its splits in a ``datasets`` dict (every
    :class:`~lightning_kd.data.SplitDataModule` and wrapper), after its ``setup``; ``None`` for other modules."""
    datasets = getattr(datamodule, "datasets", None)
    return datasets.get("train") if isinstance(datasets, dict) else None


def index_training_split(datamodule: Any) -> Dataset | None:
    """Give the training batches of ``datamodule`` their sample indices (``(input, target, index)``): its
    training split becomes an :class:`IndexedDataset` (unchanged when it already is one, or when the module keeps no
    ``datasets``). Returns the training split, or ``None``. This is what :class:`IndexedDataModule` does after the
    wrapped module's ``setup``; methods that keep per-sample state call it from their ``setup``."""
    datasets = getattr(datamodule, "datasets", None)
    if not isinstance(datasets, dict) or "train" not in datasets:
        return None
    datasets["train"] = with_indices(datasets["train"])
    return datasets["train"]


class IndexedDataModule(WrapperDataModule):
    """``datamodule`` with ``(input, target, index)`` training batches: its training split is wrapped in an
    :class:`IndexedDataset` after its ``setup``; everything else is the wrapped module's.

    The wrapped module must keep its splits in a ``datasets`` dict with a ``"train"`` entry, as every
    :class:`~lightning_kd.data.SplitDataModule` does. From the command line::

        --data lightning_kd.data.IndexedDataModule --data.datamodule lightning_kd.data.CIFAR100DataModule
    """

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if index_training_split(self.datamodule) is None:
            raise TypeError(f"IndexedDataModule needs a data module that keeps its splits in a 'datasets' dict with a "
                            f"'train' entry (as SplitDataModule does); {type(self.datamodule).__name__} does not: wrap "
                            "its training data set in lightning_kd.data.IndexedDataset instead")


__all__ = ["IndexedDataModule", "IndexedDataset", "dataset_targets", "index_training_split", "training_split",
           "with_indices"]
