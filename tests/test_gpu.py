"""The fast paths on a CUDA device: device-resident views equal the CPU's, bf16 + channels_last + compile train,
training steps never wait for the host, the teacher cache replays on the device, and the deferred finite check
names the bad step. Skipped without CUDA (they run on GPU machines with ``pytest -m gpu``)."""

import warnings

import pytest
import torch

from conftest import RandomCIFAR10, make_trainer
from lightning_kd.cache import TeacherOutputCache
from lightning_kd.data.device import Augmentation, DeviceBatches
from lightning_kd.methods import KD, Batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class RandomCIFAR10Batches(RandomCIFAR10):
    num_train, num_test = 512, 64


def gpu_trainer(**kwargs):
    return make_trainer(accelerator="gpu", devices=1, **kwargs)


def kd(**kwargs) -> KD:
    torch.manual_seed(0)
    return KD(student="resnet8", teacher="resnet20", num_classes=10, **kwargs)


def test_views_on_the_device_equal_the_cpus():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    targets = torch.arange(64)
    make = lambda: DeviceBatches(images, targets, 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), Augmentation(4, True),
                                 shuffle=True, seed=3)
    on_cpu, on_gpu = make(), make().to("cuda")
    for epoch in (0, 1):
        on_cpu.set_epoch(epoch), on_gpu.set_epoch(epoch)
        for (x, y, i), (gx, gy, gi) in zip(on_cpu, on_gpu):
            assert gx.is_cuda and torch.equal(gi.cpu(), i) and torch.equal(gy.cpu(), y)
            torch.testing.assert_close(gx.cpu(), x, atol=1e-6, rtol=0)


def test_bf16_channels_last_compile_and_fused_sgd_train():
    model = kd(channels_last=True, compile=True)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = gpu_trainer(max_epochs=1, limit_val_batches=2, precision="bf16-mixed")
    trainer.fit(model, datamodule=RandomCIFAR10Batches(batch_size=64, device_resident=True))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1
    assert trainer.optimizers[0].defaults["fused"] is True
    assert model.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v.cpu(), teacher_before[k].cpu()) for k, v in model.teacher.state_dict().items())
    assert set(model._compiled) == {"student", "teacher"}


def test_training_steps_never_wait_for_the_host():
    """CUDA's sync debug mode warns on every operation that makes the host wait for the device; none may happen
    inside training steps after the first (whose label check reads the targets once)."""
    model = kd(channels_last=True)

    class SyncWatch(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 1:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = gpu_trainer(max_steps=6, limit_val_batches=0, precision="bf16-mixed", log_every_n_steps=1000,
                              callbacks=[SyncWatch()])
        trainer.fit(model, datamodule=RandomCIFAR10Batches(batch_size=64, device_resident=True))
    torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower() and "prototype" not in
             str(w.message)]
    assert not syncs, syncs[:3]


def test_cache_replays_the_live_teacher_on_the_device(tmp_path):
    model = kd()
    cache = TeacherOutputCache(tmp_path / "cache")
    trainer = gpu_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cache])
    trainer.fit(model, datamodule=RandomCIFAR10Batches(batch_size=64, device_resident=True))
    batches = trainer.train_dataloader
    model.cuda()  # Trainer.fit hands the model back on the CPU
    index = torch.arange(0, 512, 37, device="cuda")
    with torch.no_grad():
        live = model.teacher(batches.views(index, 0)).log_softmax(-1)
    replayed = cache.replay(Batch(torch.empty(0), torch.empty(0), index), epoch=0).log_softmax(-1)
    assert replayed.is_cuda
    torch.testing.assert_close(replayed, live, atol=3e-3, rtol=1e-3)


def test_deferred_finite_check_stops_a_cuda_run_naming_the_step():
    model = kd()
    data = RandomCIFAR10Batches(batch_size=64, device_resident=True)
    original = DeviceBatches.views

    def poisoned(self, indices, epoch=None):
        out = original(self, indices, epoch)
        return out if self.epoch > 0 or not self.shuffle else torch.where(indices.view(-1, 1, 1, 1) == 7,
                                                                          float("nan"), out)

    DeviceBatches.views = poisoned
    try:
        with pytest.raises(FloatingPointError, match=r"non-finite at global step \d+; non-finite losses: ce, kd"):
            gpu_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=4).fit(model, datamodule=data)
    finally:
        DeviceBatches.views = original
