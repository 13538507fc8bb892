"""scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes): real data with no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_kd.data.base import SplitDataModule, split_indices


class DigitsDataModule(SplitDataModule):
    """scikit-learn's ``load_digits``: 1×8×8 images scaled to [0, 1] and normalised with the training split's
    mean and std, 10 classes.

    There is no official split: ``test_fraction`` of the images (seeded by ``split_seed``) is the test set and
    ``val_fraction`` is carved from the rest for validation; with ``val_fraction=0`` the test set doubles as
    the validation set.
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.25, val_fraction: float = 0.0,
                 split_seed: int = 0, shuffle_seed: int = 0, num_workers: int = 0):
        super().__init__()
        if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 - test_fraction:
            raise ValueError(f"test_fraction={test_fraction} and val_fraction={val_fraction} must leave some "
                             "training images: use 0 < test_fraction < 1 and 0 <= val_fraction < 1 - test_fraction")
        self.save_hyperparameters()
        self.datasets = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        targets = torch.tensor(digits.target, dtype=torch.long)
        hp = self.hparams
        test_idx, val_idx, train_idx = split_indices(len(targets), (hp.test_fraction, hp.val_fraction), hp.split_seed)
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        self.datasets = {name: TensorDataset(images[idx], targets[idx])
                         for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)) if len(idx)}
        self.datasets.setdefault("val", self.datasets["test"])
