"""Tests of lightning_kd.methods.init_phase: the pre-training phase FSP, AB and FT share."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer
from helpers import ADAPTER_METHODS, ADAPTER_PARTS, INIT_METHODS, OptimizedParameters, adapter_kd, parameter_ids
from lightning_kd.data import DigitsDataModule
from lightning_kd.methods.ft import FT
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.methods.vid import VID


class EpochSnapshots(Callback):
    """The model's state at the end of every training epoch, and its parts' modes during training."""

    def __init__(self):
        self.states, self.logged, self.frozen_training = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.frozen_training.append([m.training for m in pl_module.frozen_after_init()])

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        self.logged.append(set(trainer.callback_metrics))


def part_state(state: dict[str, torch.Tensor], prefix: str, exclude: str = "\0") -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(exclude)}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SaveBeforeTheModulesEpochEnd(Callback):
    """Writes a checkpoint in ``on_train_epoch_end``, which Lightning runs for such callbacks before the module's."""

    def __init__(self, dirpath):
        self.dirpath = dirpath

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.dirpath / f"epoch={trainer.current_epoch}.ckpt")


def run_ft(max_epochs: int, tmp_path=None, ckpt_path=None) -> FT:
    L.seed_everything(0)
    model = FT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, init_epochs=2,
               lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, [3], 0.1))
    callbacks = [] if tmp_path is None else [
        ModelCheckpoint(dirpath=tmp_path / "train_end", every_n_epochs=1, save_top_k=-1, filename="{epoch}"),
        ModelCheckpoint(dirpath=tmp_path / "val_end", every_n_epochs=1, save_top_k=-1, filename="{epoch}",
                        monitor="val/acc", mode="max", save_on_train_epoch_end=False),
        SaveBeforeTheModulesEpochEnd(tmp_path)]
    trainer = make_trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, deterministic=True,
                           enable_checkpointing=bool(callbacks), callbacks=callbacks)
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("name", INIT_METHODS)
def test_the_init_phase_optimizes_only_its_parts_and_freezes_them_after(name, digits):
    torch.manual_seed(0)
    model = adapter_kd(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    record, snapshots = OptimizedParameters(), EpochSnapshots()
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[record, snapshots])
    trainer.fit(model, digits)
    after_init, final = snapshots.states
    frozen = model.frozen_after_init()[0]
    where = {part: next(key for key, sub in model.named_modules() if sub is getattr(model, part)) + "."
             for part in ADAPTER_PARTS[name]}  # where each part lives now
    frozen_prefix = where[ADAPTER_PARTS[name][0]]
    init_parameters = parameter_ids(*model.init_modules())
    assert record.params[0] == record.params[1] == init_parameters
    assert not any(k.startswith("train/loss") for k in snapshots.logged[0]), "no cross-entropy in the init phase"
    if name == "FT":
        # the paraphraser alone learns; the student is not even run (BatchNorm statistics stay)
        assert states_equal(part_state(after_init, "student."), part_state(start, "student."))
        assert states_equal(part_state(after_init, where["translator"]), part_state(start, where["translator"]))
        assert not states_equal(part_state(after_init, where["paraphraser"]), part_state(start, where["paraphraser"]))
        assert record.params[2] == parameter_ids(model.student, model.translator)
        assert not states_equal(part_state(final, where["translator"]), part_state(after_init, where["translator"]))
    else:
        # student (but its classifier, which the feature loss does not reach) and connectors learn
        assert not states_equal(part_state(after_init, "student.", "student.fc"), part_state(start, "student.",
                                                                                             "student.fc"))
        assert states_equal(part_state(after_init, "student.fc"), part_state(start, "student.fc"))
        assert not states_equal(part_state(after_init, where["connectors"]), part_state(start, where["connectors"]))
        assert record.params[2] == parameter_ids(model.student)
    # afterwards: the frozen part keeps its weights, has no gradients, stays in eval mode; the student learns
    assert states_equal(part_state(final, frozen_prefix), part_state(after_init, frozen_prefix))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert snapshots.frozen_training[:2] == [[True], [True]] and snapshots.frozen_training[2:] == [[False], [False]]
    assert not states_equal(part_state(final, "student."), part_state(after_init, "student."))
    assert {"train/loss", "train/loss_ce"} <= snapshots.logged[1]


def test_the_learning_rate_schedule_counts_the_init_epochs(digits):
    model = FT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, init_epochs=1, init_lr=0.02,
               optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
               lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], 0.5))
    record = OptimizedParameters()
    trainer = make_trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, digits)
    assert record.lrs == pytest.approx([0.02, 0.1, 0.05])


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resuming_in_either_phase_gives_the_same_model(tmp_path):
    uninterrupted = run_ft(4)
    run_ft(3, tmp_path=tmp_path)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    mid_init, switched, in_main = (load(f"train_end/epoch={epoch}.ckpt") for epoch in range(3))
    # written before the switch: at the validation, and in the last init epoch's end hooks before the module's
    before_switch = [load("val_end/epoch=1.ckpt"), load("epoch=1.ckpt")]
    # the init phase: the paraphraser's optimizer, no scheduler; the switch at the end of the last init epoch
    assert not any(checkpoint["init_phase_done"] for checkpoint in (mid_init, *before_switch))
    paraphraser_size = len(list(uninterrupted.paraphraser.parameters()))
    for checkpoint in (mid_init, *before_switch):
        assert len(checkpoint["optimizer_states"][0]["param_groups"][0]["params"]) == paraphraser_size
        assert checkpoint["lr_schedulers"] == []
    assert switched["init_phase_done"] and in_main["init_phase_done"]
    assert switched["lr_schedulers"][0]["last_epoch"] == 2 and in_main["lr_schedulers"][0]["last_epoch"] == 3
    for name in ("train_end/epoch=0.ckpt", "val_end/epoch=1.ckpt", "epoch=1.ckpt", "train_end/epoch=1.ckpt",
                 "train_end/epoch=2.ckpt"):
        resumed = run_ft(4, ckpt_path=str(tmp_path / name))
        for key, value in uninterrupted.state_dict().items():
            if not key.startswith("teacher."):
                assert torch.equal(value, resumed.state_dict()[key]), f"{key} differs after resuming from {name}"


def test_init_phase_methods_share_the_mechanism():
    assert all(issubclass(ADAPTER_METHODS[name], InitPhaseDistillation) for name in INIT_METHODS)
    assert not issubclass(VID, InitPhaseDistillation)
    defaults = {name: ADAPTER_METHODS[name](student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1).hparams
                for name in INIT_METHODS}
    assert {name: (hp.init_epochs, hp.init_lr) for name, hp in defaults.items()} == {
        "FSP": (30, 0.05), "AB": (30, 0.05), "FT": (30, 0.01)}
    assert (defaults["AB"].ab_weight, defaults["AB"].margin, defaults["FSP"].fsp_weight) == (3e-3, 1.0, 1.0)


def test_a_non_finite_init_loss_stops_naming_it():
    model = FT(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, init_epochs=1)
    images = torch.randn(16, 1, 8, 8)
    images[9] = float("nan")
    loader = DataLoader(TensorDataset(images, torch.arange(16) % 10), batch_size=8)
    with pytest.raises(FloatingPointError, match=r"global step 1 \(epoch 0, batch 1\); non-finite losses: "
                                                 r"init_reconstruction"):
        make_trainer(max_epochs=1, limit_val_batches=0).fit(model, loader)


@pytest.mark.ddp
def test_two_process_ddp_switches_phase_and_trains(tmp_path):
    """Each phase leaves some parameters idle, which DDP accepts with unused-parameter detection."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "lightning_kd", "fit", "--data", str(root / "configs/data/digits.yaml"),
               "--trainer", str(root / "configs/trainer/cpu_quick.yaml"), "--model", "lightning_kd.methods.ft.FT",
               "--model.student", "cnn_tiny", "--model.teacher", "cnn_small", "--model.init_epochs", "1",
               "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
               "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert {r["epoch"] for r in rows if r.get("train/init_loss_reconstruction")} == {"0"}
    assert {r["epoch"] for r in rows if r.get("train/loss_ft")} == {"1"}
