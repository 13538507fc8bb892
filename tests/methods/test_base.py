"""The teacher–student base: freezing, checkpoints, weights loading, logging, errors, resume, precision."""

from __future__ import annotations

import copy
import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer, snapshot
from helpers import StepRecorder
from lightning_kd.cli import export_student
from lightning_kd.data import DigitsDataModule
from lightning_kd.methods import DKD, KD, Batch, DistillationModule, ProjectorKD, Supervised, get_method, list_methods
from lightning_kd.methods.base import extract_state_dict, load_weights
from lightning_kd.models import create_model


class ModeRecorder(Callback):
    """Records, at every training step, whether the teacher ran in train mode (seen from inside its forward)."""

    def __init__(self):
        self.teacher_modes: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        pl_module.teacher.register_forward_pre_hook(lambda module, args: self.teacher_modes.append(module.training))



def test_teacher_is_frozen_and_in_eval_mode_through_fit(digits, teacher_in_train_mode):
    model = KD(student=create_model("cnn_tiny", num_classes=10, in_chans=1), teacher=teacher_in_train_mode,
               num_classes=10)
    before = snapshot(model.teacher)
    recorder = ModeRecorder()
    make_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=2, callbacks=[recorder]).fit(model, digits)
    assert len(recorder.teacher_modes) >= 10
    assert not any(recorder.teacher_modes), "the teacher ran in train mode (its BatchNorm statistics would drift)"
    after = model.teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher {key} changed during fit"
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_module_train_keeps_teacher_in_eval(teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    model.train()
    assert model.student.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())


def test_teacher_is_never_in_the_optimizer(teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert optimized == {id(p) for p in model.student.parameters()}
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["weight_decay"] == 5e-4


def test_teacher_runs_without_autograd(digits, teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    digits.setup()
    batch = model.unpack_batch(next(iter(digits.train_dataloader())))
    assert not model.forward_teacher(batch).logits.requires_grad
    assert model.forward_student(batch).logits.requires_grad


def test_logs_every_named_loss_and_metric(digits, teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, digits)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "val/acc", "val/acc_top5", "val/agreement", "val/kl",
                "val/teacher_acc", "val/ece", "val/teacher_ece"):
        assert key in logged, f"{key} was not logged"
    assert torch.isclose(logged["train/loss"], logged["train/loss_ce"] + logged["train/loss_kd"], rtol=1e-5)
    results = trainer.test(model, digits, verbose=False)[0]
    assert {"test/acc", "test/acc_top5", "test/agreement", "test/kl", "test/teacher_acc"} <= set(results)


def test_metrics_against_a_manual_computation(digits, teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    results = make_trainer().test(model, digits, verbose=False)[0]
    digits.setup()
    images, targets = digits.datasets["test"].tensors
    with torch.no_grad():
        student, teacher = model.student.eval()(images), model.teacher(images)
    assert results["test/acc"] == pytest.approx((student.argmax(1) == targets).float().mean().item(), abs=1e-6)
    assert results["test/teacher_acc"] == pytest.approx((teacher.argmax(1) == targets).float().mean().item(), abs=1e-6)
    assert results["test/agreement"] == pytest.approx((student.argmax(1) == teacher.argmax(1)).float().mean().item(),
                                                      abs=1e-6)
    p_t = teacher.softmax(1)
    kl = (p_t * (p_t.log() - student.log_softmax(1))).sum(1).mean().item()
    assert results["test/kl"] == pytest.approx(kl, rel=1e-4)
    top5 = (student.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    assert results["test/acc_top5"] == pytest.approx(top5, abs=1e-6)
    # expected calibration error (Guo et al., ICML 2017), 15 equal-width confidence bins, by its definition
    confidence, predicted = student.softmax(1).max(1)
    correct = (predicted == targets).float()
    ece = 0.0
    for low in torch.arange(15) / 15:
        in_bin = (confidence > low) & (confidence <= low + 1 / 15)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    assert results["test/ece"] == pytest.approx(float(ece), abs=1e-5)


def test_no_top5_below_five_classes():
    model = Supervised(student="mlp", num_classes=3, in_chans=1)
    assert "acc_top5" not in model.val_metrics and "acc" in model.val_metrics


def test_checkpoint_leaves_teacher_out_and_restores_the_student(tmp_path, digits, teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, digits)
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("teacher.") for k in saved)
    restored = KD.load_from_checkpoint(path, student=create_model("cnn_tiny", num_classes=10, in_chans=1),
                                       teacher=copy.deepcopy(teacher_in_train_mode))
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, restored.student.state_dict()[key])
    assert not restored.teacher.training


def test_save_teacher_option_writes_the_teacher(tmp_path, digits, teacher_in_train_mode):
    model = KD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1, save_teacher=True)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    saved = torch.load(tmp_path / "kd.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("teacher.") for k in saved)


def test_names_and_teacher_weights_rebuild_everything_from_a_checkpoint(tmp_path, digits, teacher_in_train_mode):
    torch.save(teacher_in_train_mode.state_dict(), tmp_path / "teacher.pt")
    model = KD(student="cnn_tiny", teacher="cnn_small", teacher_weights=str(tmp_path / "teacher.pt"), num_classes=10,
               in_chans=1)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    restored = KD.load_from_checkpoint(tmp_path / "kd.ckpt")
    for module in ("student", "teacher"):
        expected = getattr(model, module).state_dict()
        for key, value in getattr(restored, module).state_dict().items():
            assert torch.equal(value, expected[key]), f"{module}.{key} differs after load_from_checkpoint"


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict_prefixed", "lightning"])
def test_teacher_weights_layouts(tmp_path, digits, layout):
    torch.manual_seed(1)
    source = create_model("cnn_small", num_classes=10, in_chans=1)
    state = source.state_dict()
    path = tmp_path / "weights.pt"
    if layout == "plain":
        torch.save(state, path)
    elif layout == "model":
        torch.save({"model": state, "epoch": 240}, path)
    elif layout == "state_dict_prefixed":
        torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)
    else:
        trained = Supervised(student=source, num_classes=10)
        trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
        trainer.fit(trained, digits)
        trainer.save_checkpoint(path)
        state = source.state_dict()
    teacher = create_model("cnn_small", num_classes=10, in_chans=1)
    load_weights(teacher, path)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, state[key])


def test_extract_state_dict_drops_teacher_and_strips_prefixes():
    weights = torch.zeros(2)
    state = extract_state_dict({"state_dict": {"student.fc.weight": weights, "teacher.fc.weight": weights}})
    assert list(state) == ["fc.weight"]


def test_missing_teacher_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_weights file .*does not exist"):
        KD(student="cnn_tiny", teacher="cnn_small", teacher_weights=str(tmp_path / "nope.pt"), num_classes=10)


def test_teacher_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(create_model("cnn_tiny", num_classes=10).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"does not fit the teacher.*shape mismatches.*stages\.0\.0\.0\.weight"):
        KD(student="cnn_tiny", teacher="cnn_small", teacher_weights=str(tmp_path / "tiny.pt"), num_classes=10)
    torch.save(create_model("mlp", num_classes=10).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): stages\.0\.0\.0\.weight.*unexpected keys"):
        KD(student="cnn_tiny", teacher="cnn_small", teacher_weights=str(tmp_path / "mlp.pt"), num_classes=10)


def test_a_teacher_is_required_by_distillation_methods():
    with pytest.raises(ValueError, match="KD needs a teacher"):
        KD(student="cnn_tiny", num_classes=10)


def test_teacher_with_other_class_count_is_a_clear_error(digits):
    model = KD(student="cnn_tiny", teacher=create_model("cnn_tiny", num_classes=7, in_chans=1), num_classes=10,
               in_chans=1)
    with pytest.raises(ValueError, match="the teacher has 7 classes but num_classes is 10"):
        make_trainer(max_steps=1).fit(model, digits)


def test_data_module_with_other_class_count_is_a_clear_error(digits):
    model = KD(student="cnn_tiny", teacher="cnn_tiny", num_classes=12, in_chans=1)
    with pytest.raises(ValueError, match="the data module has 10 classes but the model was built with num_classes=12"):
        make_trainer(max_steps=1).fit(model, digits)


def loader(images: torch.Tensor, targets: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images, targets), batch_size=8)


def test_labels_out_of_range_are_a_clear_error():
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    targets = torch.arange(16) % 10
    targets[3] = 12
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\].*from 0 to 12"):
        make_trainer(max_steps=2).fit(model, loader(torch.randn(16, 1, 8, 8), targets))


def test_non_finite_loss_stops_naming_step_and_losses(tmp_path):
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    images = torch.randn(32, 1, 8, 8)
    images[20] = float("nan")
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(FloatingPointError, match=r"global step 2 \(epoch 0, batch 2\); non-finite losses: ce, kd"):
        trainer.fit(model, loader(images, torch.arange(32) % 10))


@pytest.mark.parametrize("log_every_n_steps, stops_at", [(3, 2), (4, 3), (50, 6)])
def test_deferred_finite_check_names_the_first_bad_step(monkeypatch, log_every_n_steps, stops_at):
    """On accelerators the check reads a device-side record every ``log_every_n_steps`` steps (and at the end of
    the epoch): the error names the first bad step, though training went on to the next check."""
    monkeypatch.setattr(KD, "_defer_finite_check", staticmethod(lambda device: True))
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    images = torch.randn(48, 1, 8, 8)
    images[17] = float("nan")
    trainer = make_trainer(max_epochs=1, log_every_n_steps=log_every_n_steps)
    with pytest.raises(FloatingPointError, match=r"global step 2; non-finite losses: ce, kd"):
        trainer.fit(model, loader(images, torch.arange(48) % 10))
    assert trainer.global_step == stops_at


def test_losses_are_logged_on_the_steps_loggers_write_and_at_the_end(tmp_path, monkeypatch):
    """14 steps of 6 per epoch with log_every_n_steps=4: logged at steps 4, 8, 12 (the logger's), 6, 12 (epoch ends)
    and 14 (the last); the CSV holds the logger's steps with the values of those steps."""
    from lightning.pytorch.loggers import CSVLogger

    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    logged_at = []
    original = KD.distillation_losses

    def record(self, batch, student_out, teacher_out):
        losses = original(self, batch, student_out, teacher_out)
        if self.logs_this_step(self.trainer.fit_loop.epoch_loop.batch_idx):
            logged_at.append((self.global_step + 1, round(losses["kd"].item(), 6)))
        return losses

    monkeypatch.setattr(KD, "distillation_losses", record)
    trainer = make_trainer(max_steps=14, log_every_n_steps=4, logger=CSVLogger(tmp_path))
    trainer.fit(model, loader(torch.randn(48, 1, 8, 8), torch.arange(48) % 10))
    assert [step for step, _ in logged_at] == [4, 6, 8, 12, 14]
    rows = [r for r in csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()) if r.get("train/loss_kd")]
    assert [int(r["step"]) + 1 for r in rows] == [4, 8, 12]
    values = dict(logged_at)
    assert [round(float(r["train/loss_kd"]), 5) for r in rows] == [round(values[s], 5) for s in (4, 8, 12)]
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])


def test_unknown_method_and_model_names_suggest_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'KD'"):
        get_method("kd")
    with pytest.raises(ValueError, match="Did you mean 'DKD'"):
        get_method("DKDD")
    with pytest.raises(ValueError, match="unknown model 'cnn_smal'.*'cnn_small'"):
        KD(student="cnn_smal", teacher="cnn_tiny", num_classes=10)


class UserDataModule(L.LightningDataModule):
    """A user's own data module with nothing lightning-kd specific."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 20, generator=generator)
        self.y = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32)


def test_users_own_modules_and_data_work_in_a_plain_trainer():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    model = KD(student=student, teacher=teacher, num_classes=4)
    initial = snapshot(student)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(model, UserDataModule())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in initial.items())
    assert "val/agreement" in trainer.callback_metrics


def test_resume_from_a_mid_run_checkpoint_gives_the_same_student(tmp_path):
    def run(max_epochs, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        trainer = make_trainer(max_epochs=max_epochs, limit_train_batches=6, limit_val_batches=1,
                               enable_checkpointing=bool(callbacks), callbacks=list(callbacks), deterministic=True)
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return model

    uninterrupted = run(3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    run(1, callbacks=[checkpoints])
    resumed = run(3, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    for key, value in uninterrupted.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), f"student {key} differs after resuming"


def test_bf16_mixed_precision_trains_on_cpu(digits):
    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    before = snapshot(model.student)
    trainer = make_trainer(max_steps=3, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(model, digits)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["train/loss"].dtype == torch.float32
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


def test_export_student_one_liner_and_from_checkpoint(tmp_path, digits):
    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, digits)
    model.export_student(tmp_path / "student.pt")
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    export_student(str(tmp_path / "kd.ckpt"), str(tmp_path / "from_ckpt.pt"))
    for path in ("student.pt", "from_ckpt.pt"):
        deployed = create_model("cnn_tiny", num_classes=10, in_chans=1)
        deployed.load_state_dict(torch.load(tmp_path / path, weights_only=True))
        x = torch.randn(4, 1, 8, 8)
        assert torch.equal(deployed.eval()(x), model.student.eval()(x))


def test_every_method_is_a_distillation_module():
    from lightning_kd.methods import list_methods

    assert all(issubclass(get_method(name), DistillationModule) for name in list_methods())


class PixelClassifier(torch.nn.Module):
    """A 1×1-convolution 'segmenter': per-pixel logits [B, C, H, W]."""

    def __init__(self, classes=4, width=3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, width, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, classes, 1))

    def forward(self, x):
        return self.body(x)


def test_per_pixel_training_step_leaves_out_ignored_pixels():
    """A training step on [B, C, H, W] logits with labels -100 at some pixels is CE + KD averaged over the labelled
    pixels only (naive loop over the pixels)."""
    from lightning_kd.methods import KD

    torch.manual_seed(0)
    student, teacher = PixelClassifier(), PixelClassifier(width=5)
    model = KD(student, teacher, num_classes=4, ce_weight=0.3, kd_weight=0.7, temperature=2.0)
    model.log = lambda *args, **kwargs: None
    images = torch.randn(2, 1, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0, :] = -100
    labels[1, 2, 1] = -100
    loss = model.training_step((images, labels), 0)
    with torch.no_grad():
        s, t = student(images).double(), teacher(images).double()
    terms = []
    for b in range(2):
        for i in range(3):
            for j in range(3):
                if labels[b, i, j] == -100:
                    continue
                log_p_s = torch.log_softmax(s[b, :, i, j], 0)
                ce = -log_p_s[labels[b, i, j]]
                p_t, log_p_s_t = torch.softmax(t[b, :, i, j] / 2, 0), torch.log_softmax(s[b, :, i, j] / 2, 0)
                kd = 4 * (p_t * (p_t.log() - log_p_s_t)).sum()
                terms.append(0.3 * ce + 0.7 * kd)
    assert len(terms) == 14
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


class CachedTeacher(Callback):
    def on_fit_start(self, trainer, pl_module):
        pl_module.replay_teacher = lambda batch: torch.zeros(len(batch.target), 10)


def test_teacher_features_carry_no_grad():
    model = ProjectorKD(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    batch = Batch(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert all(f.requires_grad for f in model.forward_student(batch).features.values())
    assert not any(f.requires_grad for f in model.forward_teacher(batch).features.values())
    model.teacher.requires_grad_(True)  # even a teacher left trainable is hooked without autograd
    assert not any(f.requires_grad for f in model.forward_teacher(batch).features.values())


def test_logit_methods_hook_nothing(monkeypatch):
    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("a hook was registered")

    monkeypatch.setattr(nn.Module, "register_forward_hook", forbidden)
    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", forbidden)
    batch = Batch(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert model.forward_student(batch).features == {} and model.forward_teacher(batch).features == {}


def test_evaluation_and_unmixed_training_see_the_data_as_it_is(digits):
    torch.manual_seed(0)
    for mix in ("cutmix", None):
        model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix=mix)
        recorder = StepRecorder()
        make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[recorder]).fit(model, digits)
        train, val = (next(s for s in recorder.steps if s["stage"] == stage) for stage in ("train", "val"))
        assert val["student_mixing"] is None and torch.equal(val["student_in"], val["input"])
        assert torch.equal(val["teacher_in"], val["input"])
        assert torch.equal(train["student_in"], train["input"]) == (mix is None)


def test_mixed_cross_entropy_is_the_lambda_weighted_one():
    from lightning_kd.data.mixing import Mixing

    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=4, in_chans=1, mix="mixup")
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 3.0]])
    target = torch.tensor([0, 3])
    assert model.cross_entropy(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    model.mixing = Mixing(0.75, torch.tensor([1, 0]))
    # sample 0: 0.75 · CE(label 0) + 0.25 · CE(label 3); sample 1: 0.75 · CE(label 3) + 0.25 · CE(label 0)
    log_p = logits.log_softmax(-1)
    expected = -(0.75 * log_p[0, 0] + 0.25 * log_p[0, 3] + 0.75 * log_p[1, 3] + 0.25 * log_p[1, 0]) / 2
    assert model.cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mix_is_recorded_and_restored_from_checkpoints(tmp_path, digits):
    model = DKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup", mix_alpha=0.4)
    trainer = make_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = DKD.load_from_checkpoint(tmp_path / "last.ckpt")
    assert (restored.hparams.mix, restored.hparams.mix_alpha) == ("mixup", 0.4)


def test_bad_mix_options_are_clear_errors(digits):
    with pytest.raises(ValueError, match="unknown mix='mixupp'"):
        KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixupp")
    with pytest.raises(ValueError, match="mix_alpha=0.0 must be positive"):
        KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup", mix_alpha=0.0)
    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup")
    with pytest.raises(ValueError, match="replayed from a cache"):
        make_trainer(max_steps=1, limit_val_batches=0, callbacks=[CachedTeacher()]).fit(model, digits)


def test_a_teacher_built_for_another_resolution_gets_one_clear_error(digits):
    from lightning_kd.methods import KD

    model = KD(student=create_model("mlp", num_classes=10, in_chans=1, input_size=8),
               teacher=create_model("mlp", num_classes=10, in_chans=1, input_size=16), num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"the teacher \(MLP\) cannot run on inputs of shape \(\d+, 1, 8, 8\).*"
                                         r"input size.*teacher_inputs"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, digits)


def test_load_from_checkpoint_names_an_unsafe_file(tmp_path):
    import os
    from lightning_kd.methods import KD
    from lightning_kd.models.weights import UnsafeCheckpointError

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'marker'}",))

    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Payload()}}, tmp_path / "unsafe.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="re-save|state_dict"):
        KD.load_from_checkpoint(tmp_path / "unsafe.ckpt")
    assert not (tmp_path / "marker").exists()
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "unsafe.ckpt").read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.ckpt"):
        KD.load_from_checkpoint(tmp_path / "cut.ckpt")
