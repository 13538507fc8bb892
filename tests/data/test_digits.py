import pytest
import torch

from lightning_kd.data import DigitsDataModule, EpochSeededSampler, split_indices


def test_splits_are_disjoint_complete_and_seeded():
    parts = split_indices(100, (0.25, 0.1), seed=3)
    assert [len(p) for p in parts] == [25, 10, 65]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip(parts, split_indices(100, (0.25, 0.1), seed=3)))
    assert not torch.equal(parts[0], split_indices(100, (0.25, 0.1), seed=4)[0])


def test_digits_module_shapes_classes_and_normalisation():
    data = DigitsDataModule(batch_size=32, val_fraction=0.1)
    data.setup("fit")
    sizes = {name: len(ds) for name, ds in data.datasets.items()}
    assert sizes["train"] + sizes["val"] + sizes["test"] == 1797
    assert sizes["test"] == round(0.25 * 1797) and sizes["val"] == round(0.1 * 1797)
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and targets.dtype == torch.long
    assert data.num_classes == 10 and data.in_chans == 1
    train_images = data.datasets["train"].tensors[0]
    assert abs(train_images.mean().item()) < 1e-5 and abs(train_images.std().item() - 1) < 1e-4
    assert set(data.datasets["train"].tensors[1].tolist()) == set(range(10))


def test_without_validation_fraction_the_test_split_validates():
    data = DigitsDataModule()
    data.setup()
    assert data.datasets["val"] is data.datasets["test"]


def test_bad_fractions_are_a_clear_error():
    with pytest.raises(ValueError, match="must leave some training images"):
        DigitsDataModule(test_fraction=0.6, val_fraction=0.5)


def test_epoch_seeded_sampler_repeats_per_epoch():
    sampler = EpochSeededSampler(50, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
