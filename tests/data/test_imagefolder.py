"""ImageFolderDataModule on tiny ImageNet-style folders of PNG and JPEG files written with PIL."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_kd.data import ImageFolderDataModule
from lightning_kd.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[2]
KNOWN_PIXEL = (255, 0, 128)


def write_folders(root: Path) -> Path:
    """train/: classes a, b, c with two noise PNGs and one noise JPEG each (48×40); val/: a and c only, one PNG of
    the colour ``KNOWN_PIXEL`` in ``c``."""
    rng = np.random.default_rng(0)
    for name in "abc":
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            image.save(folder / (f"{i}.JPEG" if i == 2 else f"{i}.png"))
    for name in "ac":
        (root / "val" / name).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "val" / "a" / "0.png")
    Image.new("RGB", (48, 40), KNOWN_PIXEL).save(root / "val" / "c" / "0.png")
    return root


def test_classes_are_known_right_after_construction(tmp_path):
    data = ImageFolderDataModule(data_dir=str(write_folders(tmp_path)))
    assert data.num_classes == 3 and data.classes == ["a", "b", "c"] and data.in_chans == 3
    assert data.hparams.batch_size == 256 and data.hparams.image_size == 224


def test_loading_labels_and_normalisation(tmp_path):
    data = ImageFolderDataModule(data_dir=str(write_folders(tmp_path)), image_size=32, batch_size=4, num_workers=0)
    data.setup()
    assert {name: len(ds) for name, ds in data.datasets.items()} == {"train": 9, "test": 2, "val": 2}
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.long
    assert sorted(data.datasets["train"].dataset.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    test_images, test_targets = next(iter(data.test_dataloader()))
    assert test_images.shape == (2, 3, 32, 32) and test_targets.tolist() == [0, 2]
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(KNOWN_PIXEL, IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(test_images[1], expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)


def test_augmentation_only_on_training(tmp_path):
    data = ImageFolderDataModule(data_dir=str(write_folders(tmp_path)), image_size=32, num_workers=0,
                                 val_fraction=0.34, split_seed=1)
    assert [type(t).__name__ for t in data.train_transform().transforms] == \
        ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in data.eval_transform().transforms] == \
        ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert ImageFolderDataModule().eval_transform().transforms[0].size == 256
    data.setup()
    assert len(data.datasets["val"]) == 3 and len(data.datasets["train"]) == 6
    assert sorted(data.datasets["train"].indices + data.datasets["val"].indices) == list(range(9))
    torch.manual_seed(0)
    assert not torch.equal(data.datasets["train"][0][0], data.datasets["train"][0][0])
    assert torch.equal(data.datasets["val"][0][0], data.datasets["val"][0][0])


def test_missing_folders_are_one_clear_error(tmp_path):
    data = ImageFolderDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*train and .*val.*train/<class>/"):
        data.num_classes


def test_validation_classes_must_be_training_classes(tmp_path):
    write_folders(tmp_path)
    (tmp_path / "val" / "z").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "z" / "0.png")
    with pytest.raises(ValueError, match=r"class folders that .*train lacks: \['z'\]"):
        ImageFolderDataModule(data_dir=str(tmp_path), num_workers=0).setup()


def test_the_cli_links_the_folder_class_count_to_the_model(tmp_path, monkeypatch):
    from lightning_kd.cli import DistillationCLI

    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    config = yaml.safe_load((ROOT / "configs/data/imagenet.yaml").read_text())
    assert config["class_path"] == "lightning_kd.data.ImageFolderDataModule"
    cli = DistillationCLI(args=["--data", str(ROOT / "configs/data/imagenet.yaml"),
                                "--data.data_dir", str(write_folders(tmp_path)), "--model", "Supervised",
                                "--model.student", "cnn_tiny", "--trainer.accelerator", "cpu",
                                "--trainer.logger", "false"], run=False)
    assert cli.model.hparams.num_classes == 3 and cli.model.hparams.in_chans == 3
