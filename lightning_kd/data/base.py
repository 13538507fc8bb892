"""What the data modules share: seeded splits, an epoch-seeded training order, per-part transforms, and the
base of the image-classification data modules with an official train/test split."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_kd.data.device import Augmentation, DeviceBatches


class EpochSeededSampler(Sampler[int]):
    """A random permutation drawn from ``seed + epoch``: the same order for the same epoch, whether the run
    was interrupted and resumed or not (Lightning calls ``set_epoch`` at the start of every epoch)."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def split_indices(num_samples: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Split ``range(num_samples)`` at random (fixed ``seed``) into parts of the given fractions; the last
    part takes the rest."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    sizes = [round(f * num_samples) for f in fractions]
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start:start + size])
        start += size
    return parts + [order[start:]]


def first_input(sample: Any) -> torch.Tensor | None:
    """The input tensor of one sample or batch: the tensor itself, a dict's ``"input"``, a tuple's first item or an
    object's ``input`` attribute; ``None`` when there is none."""
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, dict):
        return sample.get("input")
    if isinstance(sample, (list, tuple)) and sample and isinstance(sample[0], torch.Tensor):
        return sample[0]
    return getattr(sample, "input", None)


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


class _SkippedBatches:
    """The index batches of ``batch_sampler`` after its first ``skip`` (drawn, not loaded)."""

    def __init__(self, batch_sampler: Any, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):  # a generator: the sampler is drawn at the first batch, after Lightning's set_epoch
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(batches, None)
        yield from batches

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` that Lightning resumes mid-epoch: its ``state_dict`` (stored in checkpoints) is the
    number of batches of the current epoch that training completed, given by ``progress``; after
    ``load_state_dict`` the next iteration draws the epoch's batches as before and skips that many, so a resumed
    run sees the same batches as an uninterrupted one (the order comes from the sampler's ``set_epoch``)."""

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress, self.skip = progress, 0

    def state_dict(self) -> dict[str, int]:
        return {"completed_batches": int(self.progress()) if self.progress is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = int(state.get("completed_batches", 0))

    @property
    def _index_sampler(self):
        batch_sampler = super()._index_sampler
        if self.skip:
            batch_sampler, self.skip = _SkippedBatches(batch_sampler, self.skip), 0
        return batch_sampler


def completed_batches(datamodule: L.LightningDataModule) -> Callable[[], int]:
    """The batches of the current training epoch that ``datamodule``'s trainer has completed (0 at an epoch's
    end, when the next epoch starts whole)."""

    def progress() -> int:
        trainer = datamodule.trainer
        if trainer is None:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return done if done < trainer.num_training_batches else 0

    return progress


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``self.datasets`` (``"train"``, ``"val"``, ``"test"``, filled by ``setup``), for a subclass
    that saves ``batch_size``, ``shuffle_seed`` and optionally ``num_workers`` (``None``: ``min(8, cpu count)``)
    and ``pin_memory`` (``None``: pin when CUDA is available) as hyper-parameters. The training order is a
    permutation drawn from ``shuffle_seed + epoch``."""

    datasets: dict[str, Dataset]

    @property
    def num_workers(self) -> int:
        workers = self.hparams.get("num_workers")
        return default_num_workers() if workers is None else workers

    @property
    def pin_memory(self) -> bool:
        pin = self.hparams.get("pin_memory")
        return torch.cuda.is_available() if pin is None else pin

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers
        dataset = self.datasets[split]
        if len(dataset) == 0:
            raise ValueError(f"the {split} split of {type(self).__name__} is empty: check the data directory and the "
                             "split fractions (val_fraction, test_fraction)")
        kwargs = dict(batch_size=self.hparams.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=self.pin_memory, persistent_workers=workers > 0)
        if split == "train":
            return ResumableDataLoader(dataset, progress=completed_batches(self), **kwargs)
        return DataLoader(dataset, **kwargs)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.datasets["train"]), self.hparams.shuffle_seed)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class ImageClassificationDataModule(SplitDataModule):
    """Base of the data modules with an official train/test split of images.

    The test split is the official one. ``val_fraction`` of the training images (chosen with ``split_seed``)
    is held out for validation and seen through the evaluation transform; with ``val_fraction=0`` the test split
    doubles as the validation split.

    With ``device_resident=True`` the images stay whole on the accelerator as uint8 and each batch is augmented
    (the subclass's :meth:`augmentation`, the same distribution as ``train_transform``) and normalised there
    (:mod:`lightning_kd.data.device`); batches then also carry the samples' indices. No loader processes run, and the
    views are a function of ``(shuffle_seed, epoch, index)``, which a teacher-output cache relies on.

    A subclass gives ``num_classes``, ``in_chans``, ``mean``, ``std``, ``train_transform``, ``eval_transform``,
    ``augmentation`` and ``load_split`` (the raw images as PIL images with integer targets; the dataset's ``data``
    array is what ``device_resident`` keeps), and raises the missing-data error in ``prepare_data``.
    """

    num_classes: int
    in_chans = 3

    def __init__(self, data_dir: str = "data", batch_size: int = 64, num_workers: int | None = None,
                 val_fraction: float = 0.0, split_seed: int = 0, shuffle_seed: int = 0,
                 pin_memory: bool | None = None, device_resident: bool = False):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        self.save_hyperparameters()
        self.datasets = {}
        self.arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def data_dir(self) -> Path:
        return Path(self.hparams.data_dir).expanduser()

    def train_transform(self) -> Callable:
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        raise NotImplementedError

    def load_split(self, train: bool) -> Dataset:
        """The official training (``train=True``) or test split, yielding ``(PIL image, int target)``."""
        raise NotImplementedError

    def augmentation(self) -> Augmentation:
        """The random part of ``train_transform`` as :class:`~lightning_kd.data.device.Augmentation`, for
        ``device_resident``."""
        return Augmentation()

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
        if hp.device_resident:
            train_images, train_targets = uint8_arrays(train)
            self.arrays = {"train": (train_images[train_idx], train_targets[train_idx]), "test": uint8_arrays(test)}
            self.arrays["val"] = (train_images[val_idx], train_targets[val_idx]) if len(val_idx) else self.arrays["test"]

    def _device_batches(self, split: str) -> DeviceBatches:
        trainer = self.trainer
        device, rank, world_size = (torch.device("cpu"), 0, 1) if trainer is None else \
            (trainer.strategy.root_device, trainer.global_rank, trainer.world_size)
        # validation on the test split (val_fraction=0) shares its copy on the device
        stored = "test" if self.arrays[split] is self.arrays["test"] else split
        if stored not in self._on_device or self._on_device[stored][0].device != device:
            self._on_device[stored] = tuple(t.to(device) for t in self.arrays[stored])
        images, targets = self._on_device[stored]
        train = split == "train"
        return DeviceBatches(images, targets, self.hparams.batch_size, self.mean, self.std,
                             augmentation=self.augmentation() if train else Augmentation(), shuffle=train,
                             seed=self.hparams.shuffle_seed, drop_last=train and world_size > 1, rank=rank,
                             num_replicas=world_size)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._device_batches("train") if self.hparams.device_resident else super().train_dataloader()

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._device_batches("val") if self.hparams.device_resident else super().val_dataloader()

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._device_batches("test") if self.hparams.device_resident else super().test_dataloader()

    def predict_dataloader(self) -> DataLoader | DeviceBatches:
        return self.test_dataloader()


def uint8_arrays(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's whole ``data`` as uint8 ``N×C×H×W`` and its ``targets`` as int64."""
    data = getattr(dataset, "data", None)
    if data is None:
        raise ValueError(f"{type(dataset).__name__} has no `data` array to keep on the device: use "
                         "device_resident=False")
    images = torch.as_tensor(data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)


class WrapperDataModule(L.LightningDataModule):
    """A data module built around another, ``datamodule``: everything is the wrapped module's (its ``num_classes``
    and ``in_chans`` too, so the CLI links them) unless a subclass changes it."""

    def __init__(self, datamodule: L.LightningDataModule):
        super().__init__()
        # LightningCLI gives a data module built inside another one the outer module's hyper-parameters
        # ({"_class_path": <outer class>, "datamodule": {"class_path": ..., "init_args": {...}}}): restore its own
        given = getattr(datamodule, "hparams", {})
        nested = given.get("datamodule") if str(given.get("_class_path", "")).endswith(type(self).__name__) else None
        if isinstance(nested, dict) and isinstance(nested.get("init_args"), dict):
            datamodule.hparams.clear()
            datamodule.hparams.update(nested["init_args"])
        self.datamodule = datamodule

    @property
    def num_classes(self) -> int | None:
        return getattr(self.datamodule, "num_classes", None)

    @property
    def in_chans(self) -> int:
        return getattr(self.datamodule, "in_chans", 3)

    @property
    def datasets(self) -> dict[str, Dataset]:
        """The wrapped module's splits (empty when it keeps none)."""
        return getattr(self.datamodule, "datasets", {})

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def train_dataloader(self) -> Any:
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def teardown(self, stage: str | None = None) -> None:
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
