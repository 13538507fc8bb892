"""Training without training data: a data module whose training batches carry nothing but their size, while
validation, test and prediction come from a real data module.

Data-free methods (:class:`lightning_kd.methods.datafree.DataFreeKD`) make their own training inputs. Lightning still
needs a training loader to count steps and epochs; this one yields batches of sample indices, so that a batch's
length is the batch size and ``steps_per_epoch`` batches make an epoch, and no training image is ever loaded.

>>> import lightning as L
>>> import torch
>>> from torch.utils.data import TensorDataset
>>> real = L.LightningDataModule.from_datasets(val_dataset=TensorDataset(torch.zeros(6, 1, 8, 8),
...                                                                      torch.zeros(6, dtype=torch.long)))
>>> data = DataFreeDataModule(real, batch_size=4, steps_per_epoch=3)
>>> data.setup("fit")
>>> [batch.tolist() for batch in data.train_dataloader()]
[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
>>> data.input_shape
(1, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_kd.data.base import WrapperDataModule, first_input


class SampleIndices(Dataset):
    """``length`` items, item ``i`` being the integer ``i``: stand-ins for training samples that do not exist."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return index


class DataFreeDataModule(WrapperDataModule):
    """Training batches of sample indices (``batch_size`` each, ``steps_per_epoch`` per epoch) and the validation,
    test and prediction loaders of ``datamodule``, whose training split is never asked for.

    ``num_classes`` and ``in_chans`` are those of ``datamodule`` (so the CLI links them to the model as for the
    real data module itself), and ``input_shape`` is the shape of one validation input, read after ``setup`` from
    its validation set (``None`` when it has none), which a data-free method sizes its generator with. From the
    command line::

        --data lightning_kd.data.synthetic.DataFreeDataModule --data.datamodule lightning_kd.data.DigitsDataModule

    Args:
        datamodule: the real data module, used for validation, testing and prediction only.
        batch_size: generated samples per training step (DFAD: 256 on CIFAR).
        steps_per_epoch: training steps per epoch (DFAD: 50 iterations per epoch).
    """

    def __init__(self, datamodule: L.LightningDataModule, batch_size: int = 256, steps_per_epoch: int = 50):
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError(f"batch_size and steps_per_epoch must be positive, got {batch_size} and {steps_per_epoch}")
        super().__init__(datamodule)
        self.save_hyperparameters(ignore=["datamodule"])
        self.input_shape: tuple[int, ...] | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.input_shape is None and stage in (None, "fit", "validate"):
            self.input_shape = self._validation_input_shape()

    def _validation_input_shape(self) -> tuple[int, ...] | None:
        try:
            loader = self.datamodule.val_dataloader()
        except (NotImplementedError, MisconfigurationException):  # a data module without validation data
            return None
        loader = loader[0] if isinstance(loader, (list, tuple)) and loader else loader
        dataset = getattr(loader, "dataset", None)
        try:
            sample = first_input(dataset[0])
        except (TypeError, IndexError, KeyError, NotImplementedError):
            batch = first_input(next(iter(loader), None))
            sample = None if batch is None else batch[0]
        return None if sample is None else tuple(int(size) for size in sample.shape)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(SampleIndices(hp.batch_size * hp.steps_per_epoch), batch_size=hp.batch_size)


def batch_size_of(batch: Any) -> int:
    """The batch size a :class:`DataFreeDataModule` training batch stands for: the length of its 1-D index tensor."""
    if isinstance(batch, Tensor) and batch.dim() == 1 and not batch.is_floating_point():
        return batch.shape[0]
    raise ValueError(f"a data-free method trains on its own inputs, but got a training batch of "
                     f"{_describe(batch)}: train on lightning_kd.data.synthetic.DataFreeDataModule(datamodule=<your "
                     "data module>), which yields sample indices for training and uses the data only for validation")


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"type {type(batch).__name__}"


__all__ = ["DataFreeDataModule", "SampleIndices", "batch_size_of"]
