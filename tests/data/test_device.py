"""Device-resident data: batched crop/flip/normalise equal torchvision's per-sample pipeline view for view and in
distribution; views are a function of (seed, epoch, index); the data modules serve them through a Trainer."""

import json

import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from conftest import make_trainer
from lightning_kd.data import CIFAR100DataModule, FashionMNISTDataModule
from lightning_kd.data.device import Augmentation, DeviceBatches, augment_batch, normalization, normalize_batch, view_params
from lightning_kd.methods import KD
from test_cifar import trust_files, write_cifar
from test_mnist import write_idx

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def random_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_crop_and_flip_equal_torchvision_functional_view_by_view():
    images = random_images(12)
    offsets = torch.randint(0, 9, (12, 2), generator=torch.Generator().manual_seed(1))
    flips = torch.arange(12) % 2 == 0
    out = augment_batch(images, offsets, flips, padding=4)
    for image, (top, left), flip, got in zip(images, offsets.tolist(), flips.tolist(), out):
        expected = TF.crop(TF.pad(image, [4]), top, left, 32, 32)
        expected = TF.hflip(expected) if flip else expected
        assert torch.equal(got, expected)
    assert out.dtype == torch.uint8 and out.shape == images.shape


def test_normalisation_equals_to_tensor_then_normalize():
    images = random_images(4)
    reference = torch.stack([transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])(
        Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    out = normalize_batch(images, *normalization(MEAN, STD))
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert normalize_batch(images, *normalization(MEAN, STD), torch.channels_last).is_contiguous(
        memory_format=torch.channels_last)


def test_view_parameters_are_uniform_offsets_and_fair_flips():
    offsets, flips = view_params(Augmentation(padding=4, flip=True), 90_000, seed=0, epoch=0)
    counts = torch.bincount(offsets.flatten(), minlength=9).double()
    expected = offsets.numel() / 9
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert offsets.min() == 0 and offsets.max() == 8
    assert chi2 < 26.1  # 99.9% quantile of chi-square with 8 degrees of freedom
    assert abs(flips.double().mean() - 0.5) < 4 * 0.5 / 300
    no_flip = view_params(Augmentation(padding=2), 10, seed=0, epoch=0)[1]
    assert not no_flip.any()


def test_view_distribution_matches_the_per_sample_pipeline():
    """Per-pixel mean and second moment of 4000 views of one image: torchvision (fixed torch seed) against the
    device pipeline (fixed data seed), within 5 standard errors."""
    image = random_images(1, seed=3)
    draws = 4000
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
    pipeline = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    torch.manual_seed(0)
    reference = torch.stack([pipeline(pil) for _ in range(draws)]).double()
    batches = DeviceBatches(image.expand(draws, -1, -1, -1).contiguous(), torch.zeros(draws, dtype=torch.long),
                            batch_size=500, mean=MEAN, std=STD, augmentation=Augmentation(4, True), shuffle=True,
                            seed=7)
    device = torch.cat([x for x, _, _ in batches]).double()
    for moment in (1, 2):
        ref, got = reference.pow(moment), device.pow(moment)
        stderr = torch.sqrt(ref.var(0) / draws + got.var(0) / draws).clamp_min(1e-3)
        z = (ref.mean(0) - got.mean(0)).abs() / stderr
        assert z.max() < 5.5, f"moment {moment}: largest z {z.max():.2f}"
        assert z.mean() < 1.0


def test_views_depend_on_seed_epoch_and_index_only():
    images, targets = random_images(40), torch.arange(40)
    make = lambda batch_size, seed=0: DeviceBatches(images, targets, batch_size, MEAN, STD, Augmentation(4, True),
                                                     shuffle=True, seed=seed)

    def by_index(batches, epoch):
        batches.set_epoch(epoch)
        out = {}
        for x, y, index in batches:
            assert torch.equal(y, targets[index])
            out.update({int(i): view for i, view in zip(index, x)})
        return out

    first, again, other_batching = by_index(make(8), 1), by_index(make(8), 1), by_index(make(13), 1)
    assert sorted(first) == list(range(40))
    assert all(torch.equal(first[i], again[i]) and torch.equal(first[i], other_batching[i]) for i in range(40))
    later = by_index(make(8), 2)
    assert sum(not torch.equal(first[i], later[i]) for i in range(40)) > 30
    reseeded = by_index(make(8, seed=5), 1)
    assert sum(not torch.equal(first[i], reseeded[i]) for i in range(40)) > 30
    batches = make(8)
    batches.set_epoch(1)
    torch.testing.assert_close(batches.views(torch.tensor([3, 17])), torch.stack([first[3], first[17]]))
    orders = []
    for epoch in (0, 1, 0):
        batches.set_epoch(epoch)
        orders.append(torch.cat([index for _, _, index in batches]).tolist())
    assert orders[0] == orders[2] != orders[1]


def test_processes_share_out_disjoint_equal_parts():
    images, targets = random_images(21), torch.arange(21)
    parts = [DeviceBatches(images, targets, 4, MEAN, STD, shuffle=True, drop_last=True, rank=rank, num_replicas=2)
             for rank in range(2)]
    seen = [torch.cat([index for _, _, index in part]).tolist() for part in parts]
    assert len(parts[0]) == len(parts[1]) == 2
    assert not set(seen[0]) & set(seen[1])
    assert len(DeviceBatches(images, targets, 4, MEAN, STD)) == 6


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    raw = write_cifar(tmp_path, CIFAR100DataModule, num_train=40, num_test=10)
    trust_files(monkeypatch, CIFAR100DataModule, tmp_path)
    return tmp_path, raw


def test_cifar_device_resident_serves_the_same_data(tiny_cifar):
    root, raw = tiny_cifar
    plain = CIFAR100DataModule(data_dir=str(root), batch_size=8, num_workers=0, val_fraction=0.25)
    resident = CIFAR100DataModule(data_dir=str(root), batch_size=8, num_workers=0, val_fraction=0.25,
                                  device_resident=True)
    plain.setup("fit"), resident.setup("fit")
    for split in ("val", "test"):
        expected = torch.cat([x for x, _ in getattr(plain, f"{split}_dataloader")()])
        got = list(getattr(resident, f"{split}_dataloader")())
        torch.testing.assert_close(torch.cat([x for x, _, _ in got]), expected, atol=1e-6, rtol=0)
        assert torch.cat([y for _, y, _ in got]).tolist() == torch.cat(
            [y for _, y in getattr(plain, f"{split}_dataloader")()]).tolist()
    train = resident.train_dataloader()
    assert train.augmentation == Augmentation(padding=4, flip=True) and len(train) == 4
    indices = torch.cat([index for _, _, index in train])
    assert sorted(indices.tolist()) == list(range(30))
    train_images = torch.from_numpy(raw["train"][0])[plain.datasets["train"].indices]
    assert torch.equal(train.images, train_images)


def test_fashion_mnist_device_resident_augments_only_when_asked(tmp_path):
    write_idx(tmp_path / "src")
    for augment, expected in ((False, Augmentation()), (True, Augmentation(padding=2, flip=True))):
        data = FashionMNISTDataModule(data_dir=str(tmp_path), source_dir=str(tmp_path / "src"), augment=augment,
                                      device_resident=True, batch_size=5)
        data.setup("fit")
        batches = data.train_dataloader()
        assert batches.augmentation == expected
        x, y, index = next(iter(batches))
        assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32


def test_a_method_trains_on_device_resident_data_through_a_trainer(tiny_cifar):
    root, _ = tiny_cifar
    data = CIFAR100DataModule(data_dir=str(root), batch_size=8, device_resident=True)
    model = KD(student="resnet8", teacher="resnet8", num_classes=100)
    epochs_seen = []
    original = DeviceBatches.__iter__

    def spy(self):
        if self.shuffle:
            epochs_seen.append(self.epoch)
        return original(self)

    DeviceBatches.__iter__ = spy
    try:
        trainer = make_trainer(max_epochs=2, limit_val_batches=1)
        trainer.fit(model, datamodule=data)
    finally:
        DeviceBatches.__iter__ = original
    assert trainer.global_step == 10
    assert sorted(set(epochs_seen)) == [0, 1] and epochs_seen[-1] == 1  # set by Lightning via `sampler.set_epoch`
    assert torch.isfinite(trainer.callback_metrics["val/acc"])


def test_a_dataset_without_a_data_array_is_a_clear_error():
    from lightning_kd.data.base import uint8_arrays

    with pytest.raises(ValueError, match="no `data` array.*device_resident=False"):
        uint8_arrays(object())


def test_the_cli_trains_on_device_resident_data_with_the_teacher_cache(tmp_path):
    """The README's command line: device-resident Fashion-MNIST and the cache callback added by class path."""
    from lightning_kd.cli import main

    write_idx(tmp_path / "src")
    cache = tmp_path / "cache"
    main(["fit", "--data", "FashionMNISTDataModule", "--data.data_dir", str(tmp_path), "--data.source_dir",
          str(tmp_path / "src"), "--data.device_resident", "true", "--data.batch_size", "4", "--model", "KD",
          "--model.student", "cnn_tiny", "--model.teacher", "cnn_small", "--trainer.max_epochs", "2",
          "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks+=lightning_kd.cache.TeacherOutputCache", "--trainer.callbacks.path", str(cache)])
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["epochs"], meta["num_samples"], meta["num_classes"]) == (2, 20, 10)


DDP_SCRIPT = '''
import json, sys
import lightning as L
import numpy as np
from lightning_kd.cache import TeacherOutputCache
from lightning_kd.data import CIFAR10DataModule
from lightning_kd.methods import KD


class Split:
    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, n).tolist()

    def __len__(self):
        return len(self.targets)


class Data(CIFAR10DataModule):
    def prepare_data(self):
        pass

    def load_split(self, train):
        return Split(32 if train else 8, int(train))


class Seen(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append([trainer.current_epoch, batch[2].tolist()])

    def on_train_end(self, trainer, pl_module):
        with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.seen, f)


L.seed_everything(0)
model = KD(student="resnet8", teacher="resnet8", num_classes=10)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Seen(), TeacherOutputCache(f"{sys.argv[1]}/cache")])
trainer.fit(model, datamodule=Data(batch_size=4, device_resident=True))
'''


@pytest.mark.ddp
def test_two_processes_share_the_device_resident_data_and_one_teacher_cache(tmp_path):
    """Under 2-process DDP each epoch's samples are split between the processes without overlap, with the same
    number of steps each, and the cache is built once (by rank 0) and replayed by both."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "device_ddp.py"
    script.write_text(DDP_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=root,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 8  # 2 epochs × 16 samples per process / batch 4
    for epoch in range(2):
        parts = [{i for e, batch in ranks for i in batch if e == epoch} for ranks in seen]
        assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(32))
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert (meta["epochs"], meta["num_samples"]) == (2, 32)
