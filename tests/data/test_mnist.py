"""MNIST-family data modules on tiny IDX files (gzipped or not) written in the real format, read by torchvision."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_kd.data import FashionMNISTDataModule, MNISTDataModule

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
MODULES = [MNISTDataModule, FashionMNISTDataModule]
IDS = ["mnist", "fashion"]


def write_idx(folder: Path, num_train: int = 20, num_test: int = 8, compress: bool = True) -> dict:
    """Write the four IDX files (magic 2051 for uint8 images N×28×28, 2049 for uint8 labels, big-endian sizes),
    as ``.gz`` like the official downloads or decompressed. The first test image is white, the second black.
    Returns the images and labels per split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for prefix, size in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
        if prefix == "t10k":
            images[0], images[1] = 255, 0
        labels = rng.integers(0, 10, size, dtype=np.uint8)
        files = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, size, 28, 28) + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, size) + labels.tobytes()}
        for name, content in files.items():
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (folder / name).write_bytes(content)
        raw[prefix] = (images, labels.tolist())
    return raw


def raw_folder(root: Path, module) -> Path:
    return root / module.dataset_class.__name__ / "raw"


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_gzipped_files_in_the_raw_folder_load_with_normalisation(tmp_path, module):
    raw = write_idx(raw_folder(tmp_path, module))
    data = module(data_dir=str(tmp_path), batch_size=8, num_workers=0)
    assert (data.num_classes, data.in_chans) == (10, 1)
    data.setup()
    assert (raw_folder(tmp_path, module) / "train-images-idx3-ubyte").is_file()
    assert {name: len(ds) for name, ds in data.datasets.items()} == {"train": 20, "test": 8, "val": 8}
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and images.dtype == torch.float32 and targets.dtype == torch.long
    assert 0 <= targets.min() and targets.max() < 10
    test_images, test_targets = next(iter(data.test_dataloader()))
    (mean,), (std,) = module.mean, module.std
    assert torch.allclose(test_images[0], torch.full((1, 28, 28), (1 - mean) / std), atol=1e-6)
    assert torch.allclose(test_images[1], torch.full((1, 28, 28), -mean / std), atol=1e-6)
    expected = (torch.from_numpy(raw["t10k"][0]).float().unsqueeze(1) / 255 - mean) / std
    assert torch.allclose(test_images, expected, atol=1e-6) and test_targets.tolist() == raw["t10k"][1]


def test_normalisation_constants():
    assert (MNISTDataModule.mean, MNISTDataModule.std) == ((0.1307,), (0.3081,))
    assert (FashionMNISTDataModule.mean, FashionMNISTDataModule.std) == ((0.2860,), (0.3530,))


def test_decompressed_files_load_as_they_are(tmp_path):
    write_idx(raw_folder(tmp_path, MNISTDataModule), compress=False)
    data = MNISTDataModule(data_dir=str(tmp_path), num_workers=0)
    data.setup()
    assert len(data.datasets["train"]) == 20


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_source_dir_fills_the_raw_folder(tmp_path, compress):
    write_idx(tmp_path / "system", compress=compress)
    data = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), source_dir=str(tmp_path / "system"), num_workers=0)
    data.setup()
    assert len(data.datasets["train"]) == 20 and len(data.datasets["test"]) == 8
    staged = sorted(p.name for p in raw_folder(tmp_path / "data", FashionMNISTDataModule).iterdir())
    assert staged == sorted(data.file_names)


def test_augmentation_is_off_by_default_and_only_on_training(tmp_path):
    raw = write_idx(raw_folder(tmp_path, FashionMNISTDataModule))
    plain = FashionMNISTDataModule(data_dir=str(tmp_path), num_workers=0)
    assert [type(t).__name__ for t in plain.train_transform().transforms] == ["ToTensor", "Normalize"]
    names = [type(t).__name__ for t in FashionMNISTDataModule(augment=True).train_transform().transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    names = [type(t).__name__ for t in MNISTDataModule(augment=True).train_transform().transforms]
    assert names == ["RandomCrop", "ToTensor", "Normalize"]

    data = FashionMNISTDataModule(data_dir=str(tmp_path), num_workers=0, augment=True, val_fraction=0.25)
    data.setup()
    (mean,), (std,) = data.mean, data.std
    index = data.datasets["train"].indices[0]
    unaugmented = (torch.from_numpy(raw["train"][0][index]).float() / 255 - mean) / std
    torch.manual_seed(0)
    assert any(not torch.allclose(data.datasets["train"][0][0][0], unaugmented) for _ in range(10))
    val_images = torch.stack([data.datasets["val"][i][0][0] for i in range(len(data.datasets["val"]))])
    val_raw = torch.from_numpy(raw["train"][0][data.datasets["val"].indices]).float()
    assert torch.allclose(val_images, (val_raw / 255 - mean) / std, atol=1e-6)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    write_idx(raw_folder(tmp_path, MNISTDataModule))
    splits = []
    for seed in (5, 5, 6):
        data = MNISTDataModule(data_dir=str(tmp_path), num_workers=0, val_fraction=0.2, split_seed=seed)
        data.setup()
        splits.append((data.datasets["train"].indices, data.datasets["val"].indices))
    train_idx, val_idx = splits[0]
    assert len(val_idx) == 4 and sorted(train_idx + val_idx) == list(range(20))
    assert splits[1] == splits[0] and splits[2][1] != val_idx


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_missing_data_is_one_clear_error(tmp_path, module):
    data = module(data_dir=str(tmp_path), source_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*missing from .*raw or .*elsewhere"):
        data.setup()


def test_configs_build_the_modules():
    for name, module in (("mnist", MNISTDataModule), ("fashion_mnist", FashionMNISTDataModule)):
        config = yaml.safe_load((ROOT / f"configs/data/{name}.yaml").read_text())
        assert config["class_path"] == f"lightning_kd.data.{module.__name__}"
        assert module(**config["init_args"]).num_classes == 10


@pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="needs Debian's dataset-fashion-mnist package")
def test_real_fashion_mnist_offline_from_the_debian_package(tmp_path):
    data = FashionMNISTDataModule(data_dir=str(tmp_path), source_dir=str(DEBIAN_FASHION), num_workers=0)
    data.setup()
    assert len(data.datasets["train"]) == 60000 and len(data.datasets["test"]) == 10000
    targets = data.datasets["test"].dataset.targets
    assert torch.bincount(targets).tolist() == [1000] * 10
    pixels = data.datasets["train"].dataset.data.float() / 255
    assert abs(pixels.mean().item() - data.mean[0]) < 1e-3 and abs(pixels.std().item() - data.std[0]) < 1e-3
