"""The teacher-output cache: replayed soft labels equal the live teacher's on the same views, the teacher does not
run in training steps, and a cache is rebuilt exactly when what it depends on changes."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import RandomCIFAR10, make_trainer
from lightning_kd.cache import TeacherOutputCache, expand_top_k
from lightning_kd.methods import KD, Batch, FitNet


def data(**kwargs) -> RandomCIFAR10:
    return RandomCIFAR10(batch_size=8, device_resident=True, **kwargs)


def kd(seed: int = 0) -> KD:
    torch.manual_seed(seed)
    return KD(student="resnet8", teacher="resnet8", num_classes=10)


def test_expanded_top_k_keeps_the_top_classes_and_spreads_the_rest():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.5]])
    logp = logits.log_softmax(-1)
    values, classes = logp.topk(2, dim=-1)
    probs = expand_top_k(values, classes, 4).softmax(-1)
    p = logits.softmax(-1)
    first_rest = (1 - p[0, 0] - p[0, 1]) / 2
    torch.testing.assert_close(probs[0], torch.stack([p[0, 0], p[0, 1], first_rest, first_rest]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(expand_top_k(logp, None, 4), logp)
    # hand-computed: logits (2, 1, 0, -1) give p0 = e^2 / (e^2 + e + 1 + e^-1) = 0.6439
    assert math.isclose(probs[0, 0].item(), 0.6439, abs_tol=1e-4)


@pytest.mark.parametrize("top_k", [None, 3])
def test_replayed_soft_labels_equal_the_live_teachers_on_the_same_views(tmp_path, top_k):
    model, datamodule = kd(), data()
    cache = TeacherOutputCache(tmp_path / "cache", top_k=top_k, batch_size=5)
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[cache])
    trainer.fit(model, datamodule=datamodule)
    batches = trainer.train_dataloader
    index = torch.tensor([0, 5, 11, 23])
    for epoch in range(2):
        with torch.no_grad():
            live = model.teacher(batches.views(index, epoch)).log_softmax(-1)
        replayed = cache.replay(Batch(torch.empty(0), torch.empty(0), index), epoch=epoch).log_softmax(-1)
        if top_k is None:
            torch.testing.assert_close(replayed, live, atol=2e-3, rtol=1e-3)
        else:
            values, classes = live.topk(3, dim=-1)
            torch.testing.assert_close(replayed.gather(1, classes), values, atol=2e-3, rtol=1e-3)
            rest = (1 - values.exp().sum(-1, keepdim=True)) / 7
            others = torch.ones_like(live, dtype=torch.bool).scatter_(1, classes, False)
            torch.testing.assert_close(replayed.exp()[others].view(4, 7), rest.expand(4, 7), atol=2e-4, rtol=1e-2)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["top_k"] == (10 if top_k is None else 3)
    assert (tmp_path / "cache" / "indices.npy").is_file() == (top_k is not None)


def test_the_teacher_does_not_run_in_training_steps_and_losses_match_the_live_run(tmp_path):
    calls = []
    losses = {}
    for cached in (False, True):
        model = kd()
        model.teacher.register_forward_hook(lambda module, args, out: calls.append((cached, module.training)))
        callbacks = [TeacherOutputCache(tmp_path / "cache")] if cached else []
        trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, datamodule=data())
        losses[cached] = trainer.callback_metrics["train/loss_kd"]
        assert model.replay_teacher is None
    torch.testing.assert_close(losses[True], losses[False], atol=1e-3, rtol=1e-3)
    # the live run's step plus the build's forwards (24 views × 1 epoch at 1024 per batch)
    assert [c for c, _ in calls].count(False) == 1 and [c for c, _ in calls].count(True) == 1


def test_a_cache_is_reused_for_the_same_run_and_rebuilt_for_another_teacher(tmp_path):
    path = tmp_path / "cache"

    def fit(model, epochs=1, **kwargs):
        make_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[TeacherOutputCache(path)]).fit(
            model, datamodule=data(**kwargs))
        return (path / "logprobs.npy").stat().st_mtime_ns

    first = fit(kd())
    assert fit(kd()) == first
    assert fit(kd(), shuffle_seed=1) != first
    again = fit(kd(), shuffle_seed=1)
    assert fit(kd(seed=1), shuffle_seed=1) != again
    shape = np.load(path / "logprobs.npy", mmap_mode="r").shape
    assert shape == (1, 24, 10)
    fit(kd(seed=1), epochs=2, shuffle_seed=1)
    assert np.load(path / "logprobs.npy", mmap_mode="r").shape == (2, 24, 10)


def test_clear_errors_for_per_sample_data_and_feature_methods(tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32),
                                                                        torch.arange(8)), batch_size=4)
    with pytest.raises(ValueError, match="device_resident=True"):
        make_trainer(max_steps=1, callbacks=[TeacherOutputCache(tmp_path)]).fit(kd(), loader)
    fitnet = FitNet(student="resnet8", teacher="resnet8", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="replays logits only"):
        make_trainer(max_steps=1, callbacks=[TeacherOutputCache(tmp_path)]).fit(fitnet, datamodule=data())


def test_a_run_resumed_in_the_middle_of_an_epoch_replays_that_epochs_views(tmp_path):
    """Lightning skips `on_train_epoch_start` when it resumes mid-epoch: the replayed epoch must still be the one
    whose views the data serves."""
    import lightning as L

    class SaveAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # epoch 1, after its first batch
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    class Spy(TeacherOutputCache):
        def outputs(self, epoch, device):
            self.seen.append((epoch, self._trainer_ref.current_epoch))
            return super().outputs(epoch, device)

        def on_train_start(self, trainer, pl_module):
            self.seen, self._trainer_ref = [], trainer
            super().on_train_start(trainer, pl_module)

    make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[TeacherOutputCache(tmp_path / "cache"), SaveAt()]).fit(
        kd(), datamodule=data())
    spy = Spy(tmp_path / "cache")
    make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[spy]).fit(kd(), datamodule=data(),
                                                                         ckpt_path=tmp_path / "mid.ckpt")
    assert spy.seen == [(1, 1), (1, 1)]  # the two remaining steps of epoch 1 replay epoch 1 (before the fix: 0)
