"""Tests of lightning_kd.data.views: the strong-augmentation view and its operations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PILCIFAR10, strong_data
from lightning_kd.data.base import TransformedSubset
from lightning_kd.data.views import OPERATIONS, FixMatchRandAugment, StrongViewDataModule, StrongViewDataset, cutout


def test_strong_view_batches_share_target_and_index_and_differ_from_the_weak_view():
    data = strong_data()
    data.setup("fit")
    train = data.datasets["train"]
    assert isinstance(train, StrongViewDataset) and isinstance(train.subset, TransformedSubset)
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input", "target", "index", "views"} and set(batch["views"]) == {"strong"}
    weak, strong = batch["input"], batch["views"]["strong"]
    assert weak.shape == strong.shape == (8, 3, 32, 32) and strong.dtype == torch.float32
    assert all(not torch.allclose(w, s) for w, s in zip(weak, strong))
    raw = train.subset.dataset
    for i, target in zip(batch["index"].tolist(), batch["target"].tolist()):
        assert raw.targets[train.subset.indices[i]] == target
    data.setup("fit")  # a second setup keeps one wrapper
    assert data.datasets["train"] is train
    assert isinstance(data.datasets["val"], TransformedSubset)
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8,)


def test_strong_view_is_normalised_with_the_wrapped_modules_statistics():
    data = strong_data()
    data.setup("fit")
    torch.manual_seed(1)
    views = torch.stack([data.datasets["train"][0]["views"]["strong"] for _ in range(4)])
    low = (0 - torch.tensor(PILCIFAR10.mean)) / torch.tensor(PILCIFAR10.std)
    high = (1 - torch.tensor(PILCIFAR10.mean)) / torch.tensor(PILCIFAR10.std)
    assert (views.amin(dim=(0, 2, 3)) >= low - 1e-5).all() and (views.amax(dim=(0, 2, 3)) <= high + 1e-5).all()
    assert not torch.allclose(views[0], views[1])  # a fresh draw each time


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_operation_and_cutout_keep_size_and_mode(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert(mode)
    for name, operation, low, high in OPERATIONS:
        for value in (low, high):
            out = operation(image, value)
            assert (out.size, out.mode) == ((32, 32), mode), name
    patched = np.asarray(cutout(image, 0.25, (16.0, 16.0)))
    assert (patched[13:20, 13:20] == (np.array((125, 123, 114)) if mode == "RGB" else 121)).all()
    assert np.array_equal(np.asarray(cutout(image, 0.0, (16.0, 16.0))), np.asarray(image))
    assert FixMatchRandAugment(2)(image).size == (32, 32)


def test_errors_name_the_per_sample_pipeline(digits):
    with pytest.raises(ValueError, match="device_resident=True.*per-sample pipeline"):
        StrongViewDataModule(PILCIFAR10(device_resident=True))
    with pytest.raises(ValueError, match="TransformedSubset.*DigitsDataModule keeps TensorDataset"):
        StrongViewDataModule(digits).setup("fit")
