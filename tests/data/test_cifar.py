"""CIFAR data modules on tiny data sets written in the real python-pickle format, loaded through torchvision."""

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_kd.data import CIFAR10DataModule, CIFAR100DataModule

ROOT = Path(__file__).resolve().parents[2]
MODULES = [CIFAR10DataModule, CIFAR100DataModule]
KNOWN_PIXEL = (255, 0, 128)


def write_cifar(root: Path, module: type[CIFAR10DataModule], num_train: int = 20, num_test: int = 6) -> dict:
    """Write a tiny CIFAR-10 or CIFAR-100 in the layout and pickle format of the official python version
    (``data``: uint8 N×3072, red then green then blue planes; ``labels`` or ``fine_labels``; the meta file with
    the class names). The first test image is filled with ``KNOWN_PIXEL``. Returns the images as N×3×32×32."""
    rng = np.random.default_rng(0)
    cls = module.dataset_class
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    hundred = module.num_classes == 100
    train_files = [name for name, _ in cls.train_list]
    splits = {"train": [], "test": []}

    def write_batch(name: str, size: int, split: str) -> None:
        data = rng.integers(0, 256, (size, 3072), dtype=np.uint8)
        if split == "test" and not splits["test"]:
            data[0] = np.repeat(np.array(KNOWN_PIXEL, dtype=np.uint8), 1024)
        labels = rng.integers(0, module.num_classes, size).tolist()
        entry = {"batch_label": name, "data": data, "filenames": [f"{name}_{i}.png" for i in range(size)]}
        if hundred:
            entry.update(fine_labels=labels, coarse_labels=[label // 5 for label in labels])
        else:
            entry["labels"] = labels
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        splits[split].append((data.reshape(size, 3, 32, 32), labels))

    for name in train_files:
        write_batch(name, num_train // len(train_files), "train")
    write_batch(cls.test_list[0][0], num_test, "test")
    names = [f"class_{i}" for i in range(module.num_classes)]
    meta = {"fine_label_names": names, "coarse_label_names": names[:20]} if hundred else \
        {"label_names": names, "num_cases_per_batch": num_train // 5, "num_vis": 3072}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))
    return {split: (np.concatenate([d for d, _ in parts]), sum((t for _, t in parts), []))
            for split, parts in splits.items()}


def trust_files(monkeypatch, module: type[CIFAR10DataModule], root: Path) -> None:
    """torchvision decides that CIFAR is present by `_check_integrity`: every batch file must exist AND have the
    MD5 listed in the class's `train_list` / `test_list` (and the meta file the one in `meta`, checked in
    `_load_meta`). Tiny files cannot have the official MD5s, so the test puts their own MD5s into those class
    tables: loading still runs torchvision's real check and reader, and the data module's code is unchanged."""
    cls = module.dataset_class
    folder = root / cls.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def normalised(images: np.ndarray, module: type[CIFAR10DataModule]) -> torch.Tensor:
    mean, std = torch.tensor(module.mean).view(3, 1, 1), torch.tensor(module.std).view(3, 1, 1)
    return (torch.from_numpy(images).float() / 255 - mean) / std


@pytest.fixture(params=MODULES, ids=["cifar10", "cifar100"])
def tiny(request, tmp_path, monkeypatch):
    module = request.param
    raw = write_cifar(tmp_path, module)
    trust_files(monkeypatch, module, tmp_path)
    return module, tmp_path, raw


def test_shapes_labels_and_normalisation(tiny):
    module, root, raw = tiny
    data = module(data_dir=str(root), batch_size=8, num_workers=0)
    assert (data.num_classes, data.in_chans) == (module.num_classes, 3)
    data.setup("fit")
    assert {name: len(ds) for name, ds in data.datasets.items()} == {"train": 20, "test": 6, "val": 6}
    assert data.datasets["val"] is data.datasets["test"]
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.long
    assert 0 <= targets.min() and targets.max() < module.num_classes
    test_images, test_targets = next(iter(data.test_dataloader()))
    assert torch.allclose(test_images, normalised(raw["test"][0], module), atol=1e-6)
    assert test_targets.tolist() == raw["test"][1]
    expected = [(value / 255 - m) / s for value, m, s in zip(KNOWN_PIXEL, module.mean, module.std)]
    assert torch.allclose(test_images[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(test_images[0].amin(dim=(1, 2)), test_images[0].amax(dim=(1, 2)))


def test_validation_split_is_seeded_disjoint_and_not_augmented(tiny):
    module, root, raw = tiny
    data = module(data_dir=str(root), num_workers=0, val_fraction=0.25, split_seed=3)
    data.setup("fit")
    train_idx, val_idx = data.datasets["train"].indices, data.datasets["val"].indices
    assert len(val_idx) == 5 and len(train_idx) == 15 and len(data.datasets["test"]) == 6
    assert sorted(train_idx + val_idx) == list(range(20))
    same, other = (module(data_dir=str(root), num_workers=0, val_fraction=0.25, split_seed=s) for s in (3, 4))
    same.setup(), other.setup()
    assert same.datasets["val"].indices == val_idx and other.datasets["val"].indices != val_idx
    val_images = torch.stack([data.datasets["val"][i][0] for i in range(len(val_idx))])
    assert torch.allclose(val_images, normalised(raw["train"][0][val_idx], module), atol=1e-6)
    assert [data.datasets["val"][i][1] for i in range(len(val_idx))] == [raw["train"][1][i] for i in val_idx]

    torch.manual_seed(0)
    plain = normalised(raw["train"][0][train_idx[:1]], module)[0]
    draws = [data.datasets["train"][0][0] for _ in range(10)]
    assert any(not torch.allclose(draw, plain) for draw in draws)
    assert all(draw.shape == (3, 32, 32) for draw in draws)


def test_training_order_follows_the_shuffle_seed(tiny):
    module, root, _ = tiny
    orders = []
    for seed in (0, 0, 1):
        data = module(data_dir=str(root), num_workers=0, shuffle_seed=seed)
        data.setup()
        orders.append(list(data.train_dataloader().sampler))
    assert orders[0] == orders[1] != orders[2]


def test_the_archive_is_extracted_when_the_folder_is_missing(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar(source, CIFAR10DataModule)
    trust_files(monkeypatch, CIFAR10DataModule, source)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = CIFAR10DataModule(data_dir=str(data_dir), num_workers=0)
    data.setup()
    assert len(data.datasets["train"]) == 20 and (data_dir / "cifar-10-batches-py" / "test_batch").is_file()


@pytest.mark.parametrize("module", MODULES, ids=["cifar10", "cifar100"])
def test_missing_data_is_one_clear_error(tmp_path, module):
    data = module(data_dir=str(tmp_path))
    folder = module.dataset_class.base_folder
    with pytest.raises(FileNotFoundError, match=f"{folder} lacks .*download=True.*{module.dataset_class.filename}"):
        data.setup()


def test_files_that_fail_torchvision_checksum_are_a_clear_error(tmp_path):
    write_cifar(tmp_path, CIFAR100DataModule)
    with pytest.raises(RuntimeError, match="differ from the official CIFAR-100 release"):
        CIFAR100DataModule(data_dir=str(tmp_path), num_workers=0).setup()


def test_defaults_follow_the_cifar_recipe():
    data = CIFAR100DataModule()
    assert data.hparams.batch_size == 64 and data.hparams.data_dir == "data" and not data.hparams.download
    assert 1 <= data.num_workers <= 8 and data.pin_memory == torch.cuda.is_available()
    names = [type(t).__name__ for t in data.train_transform().transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert data.train_transform().transforms[0].padding == 4
    assert [type(t).__name__ for t in data.eval_transform().transforms] == ["ToTensor", "Normalize"]
    assert CIFAR100DataModule.mean == (0.5071, 0.4867, 0.4408) and CIFAR10DataModule.std == (0.2470, 0.2435, 0.2616)
    with pytest.raises(ValueError, match="val_fraction"):
        CIFAR10DataModule(val_fraction=1.0)


@pytest.mark.parametrize("name, module", [("cifar10", CIFAR10DataModule), ("cifar100", CIFAR100DataModule)])
def test_config_builds_the_module(name, module):
    config = yaml.safe_load((ROOT / f"configs/data/{name}.yaml").read_text())
    assert config["class_path"] == f"lightning_kd.data.{module.__name__}"
    assert module(**config["init_args"]).hparams.batch_size == 64


def test_fit_through_the_cli(tmp_path, monkeypatch):
    from lightning_kd.cli import main

    write_cifar(tmp_path, CIFAR100DataModule)
    trust_files(monkeypatch, CIFAR100DataModule, tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning-kd"])
    cli = main(["fit", "--data", str(ROOT / "configs/data/cifar100.yaml"), "--data.data_dir", str(tmp_path),
                "--data.num_workers", "0", "--model", "Supervised", "--model.student", "cnn_tiny",
                "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.default_root_dir", str(tmp_path), "--seed_everything", "0"])
    assert cli.model.hparams.num_classes == 100 and cli.model.hparams.in_chans == 3
    assert cli.trainer.state.finished
