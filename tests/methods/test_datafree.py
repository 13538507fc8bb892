"""DataFreeKD: trains out of the box without reading the training set, keeps generator and student in separate
optimizers, leaves the teacher untouched, its losses equal naive formulas on hooked BatchNorm inputs, the generator
is checkpointed but not exported, and on digits it beats the same student distilled on noise."""

from __future__ import annotations

import sys
import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import make_trainer, snapshot
from helpers import ROOT
from lightning_kd.cli import main
from lightning_kd.data import DigitsDataModule
from lightning_kd.data.synthetic import DataFreeDataModule
from lightning_kd.methods.datafree import DataFreeKD
from lightning_kd.methods.supervised import Supervised
from lightning_kd.nn.generator import ImageGenerator


SMALL_GENERATOR = {"latent_dim": 32, "generator_width": 8}


def parameters_changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def random_val_data(num_classes: int, samples: int = 8) -> L.LightningDataModule:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, num_classes, (samples,), generator=generator)
    return L.LightningDataModule.from_datasets(val_dataset=TensorDataset(images, labels), batch_size=4)


class Forbidden(Dataset):
    """A training set that fails when read."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        raise AssertionError("the training set was read")


class DigitsWithoutTraining(DigitsDataModule):
    """Digits whose training split raises when read or asked for, and whose validation reads are counted."""

    val_reads = 0

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.datasets["train"] = Forbidden(len(self.datasets["train"]))

    def train_dataloader(self):
        raise AssertionError("the training loader was asked for")

    def val_dataloader(self):
        type(self).val_reads += 1
        return super().val_dataloader()


def parameters_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def naive_bn_prior(inputs: list[torch.Tensor], layers: list[nn.BatchNorm2d]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for x, layer in zip(inputs, layers):
        x = x.double()
        for stat, running in (("mean", layer.running_mean), ("var", layer.running_var)):
            squares = torch.zeros((), dtype=torch.float64)
            for c in range(x.shape[1]):
                values = x[:, c].reshape(-1)
                mean = values.sum() / len(values)
                value = mean if stat == "mean" else ((values - mean) ** 2).sum() / len(values)
                squares = squares + (value - running[c].double()) ** 2
            total = total + squares.sqrt()
    return total


def naive_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(s.shape[0]):
        p_t = torch.softmax(t[i].double() / temperature, 0)
        p_s = torch.softmax(s[i].double() / temperature, 0)
        total = total + sum(p_t[c] * torch.log(p_t[c] / p_s[c]) for c in range(s.shape[1])) * temperature ** 2
    return total / s.shape[0]


def train_digits_teacher() -> nn.Module:
    L.seed_everything(0, verbose=False)
    teacher = Supervised(student="cnn_small", num_classes=10, in_chans=1,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4))
    make_trainer(max_epochs=10, limit_val_batches=0).fit(teacher, DigitsDataModule(batch_size=64))
    return teacher.student


def distil_on_digits(teacher: nn.Module, generator: str, seed: int = 0) -> tuple[float, float]:
    """Validation accuracy of the student and of the teacher after 5 epochs of 20 steps of 64 inputs."""
    L.seed_everything(seed, verbose=False)
    model = DataFreeKD(student="cnn_tiny", teacher=teacher, num_classes=10, in_chans=1, generator=generator,
                       latent_dim=64, generator_width=16)
    trainer = make_trainer(max_epochs=5)
    data = DataFreeDataModule(DigitsDataModule(batch_size=256), batch_size=64, steps_per_epoch=20)
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)[0]
    return metrics["val/acc"], metrics["val/teacher_acc"]


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
def test_trains_out_of_the_box(pair):
    torch.manual_seed(0)
    if pair == "digits":
        model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        real, shape = DigitsDataModule(batch_size=64), (1, 8, 8)
    elif pair == "resnet":
        model = DataFreeKD(student="resnet8x4", teacher="resnet32x4", num_classes=100, **SMALL_GENERATOR)
        real, shape = random_val_data(100), (3, 32, 32)
    else:
        model = DataFreeKD(student="timm:resnet10t", teacher="timm:resnet18", num_classes=10, **SMALL_GENERATOR)
        real, shape = random_val_data(10), (3, 32, 32)
    assert model.generator is None, "without input_shape the generator waits for the data"
    student = snapshot(model.student)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataFreeDataModule(real, batch_size=4, steps_per_epoch=2))
    assert tuple(model.hparams.input_shape) == shape and model.generator.image_shape == shape
    assert trainer.global_step == model.hparams.student_steps + 1, "one training step: 5 student + 1 generator steps"
    for name in ("", "_l1", "_generator", "_generator_adversarial", "_generator_bn"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{name}"]), f"train/loss{name} missing or not finite"
    assert parameters_changed(student, model.student)


def test_generated_images_have_the_datas_shape_and_normalised_statistics():
    torch.manual_seed(0)
    for shape in [(1, 8, 8), (3, 32, 32), (1, 28, 28), (2, 30, 18)]:
        generator = ImageGenerator(shape, latent_dim=16, width=8)
        images = generator(torch.randn(64, 16))
        assert images.shape == (64, *shape)
        per_channel = images.transpose(0, 1).reshape(shape[0], -1)
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(per_channel.var(1, unbiased=False), torch.ones(shape[0]), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        ImageGenerator((20,))


def test_generator_and_student_have_separate_optimizers_and_schedules():
    torch.manual_seed(0)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **SMALL_GENERATOR,
                       lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5))
    trainer = make_trainer(max_epochs=2, limit_val_batches=0)
    data = DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=8, steps_per_epoch=1)
    trainer.fit(model, data)
    student_opt, generator_opt = trainer.optimizers
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    in_student = ids(p for group in student_opt.param_groups for p in group["params"])
    in_generator = ids(p for group in generator_opt.param_groups for p in group["params"])
    assert in_student == ids(model.student.parameters())
    assert in_generator == ids(model.generator.parameters())
    assert not in_student & in_generator
    assert not ids(model.teacher.parameters()) & (in_student | in_generator)
    assert isinstance(student_opt, torch.optim.SGD) and isinstance(generator_opt, torch.optim.Adam)
    assert generator_opt.defaults["lr"] == 1e-3
    # the epoch-wise schedule is stepped by hand for both optimizers (manual optimization): two halvings
    assert student_opt.param_groups[0]["lr"] == pytest.approx(0.05 / 4)
    assert generator_opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


def test_each_step_updates_only_its_own_part():
    torch.manual_seed(0)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **SMALL_GENERATOR)
    teacher = snapshot(model.teacher)
    moved = []

    def watch(step, role):
        def wrapped(*args):
            before = {part: parameters_of(getattr(model, part)) for part in ("student", "generator")}
            out = step(*args)
            after = {part: parameters_of(getattr(model, part)) for part in ("student", "generator")}
            moved.append((role, {part for part in before if any(not torch.equal(v, after[part][k])
                                                               for k, v in before[part].items())}))
            assert all(p.requires_grad for p in model.student.parameters()), "the student was left frozen"
            if role == "student":  # the test runs one training step: the generator has no gradients before its own
                assert all(p.grad is None for p in model.generator.parameters()), "the student step reached G"
            return out
        return wrapped

    model._student_step = watch(model._student_step, "student")
    model._generator_step = watch(model._generator_step, "generator")
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=8, steps_per_epoch=2))
    assert moved == [("student", {"student"})] * 5 + [("generator", {"generator"})]
    assert not parameters_changed(teacher, model.teacher)


def test_the_training_set_is_never_read():
    torch.manual_seed(0)
    DigitsWithoutTraining.val_reads = 0
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **SMALL_GENERATOR)
    trainer = make_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, DataFreeDataModule(DigitsWithoutTraining(batch_size=64), batch_size=8, steps_per_epoch=2))
    assert trainer.global_step == 2 * (model.hparams.student_steps + 1)
    assert DigitsWithoutTraining.val_reads > 0 and "val/acc" in trainer.callback_metrics


def test_real_training_data_is_refused_before_it_is_used():
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **SMALL_GENERATOR)
    with pytest.raises(ValueError, match=r"must not read the training data.*DigitsWithoutTraining.*DataFreeDataModule"):
        make_trainer(max_steps=2).fit(model, DigitsWithoutTraining(batch_size=64))
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                       **SMALL_GENERATOR)
    with pytest.raises(ValueError, match=r"trains on its own inputs.*list of 2 items.*DataFreeDataModule"):
        make_trainer(max_steps=2, limit_val_batches=0).fit(model, loader)


def test_teacher_is_bit_identical_and_in_eval_mode_after_fit(teacher_in_train_mode):
    before = snapshot(teacher_in_train_mode)
    model = DataFreeKD(student="cnn_tiny", teacher=teacher_in_train_mode, num_classes=10, in_chans=1,
                       **SMALL_GENERATOR)
    trainer = make_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=8, steps_per_epoch=2))
    after = model.teacher.state_dict()
    assert set(before) == set(after) and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(module.training for module in model.teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("discrepancy", ["l1", "kl"])
def test_losses_match_naive_formulas(discrepancy):
    torch.manual_seed(0)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                       discrepancy=discrepancy, temperature=2.0, adversarial_weight=0.7, bn_weight=3.0,
                       **SMALL_GENERATOR)
    model.train()
    with torch.no_grad():  # a teacher with non-trivial running statistics
        for layer in model.teacher_bn_layers():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    images = model.synthesize(16)
    layers = [m for m in model.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    hooked = {}
    handles = [layer.register_forward_pre_hook(lambda m, args: hooked.__setitem__(m, args[0])) for layer in layers]
    teacher_logits = model.teacher(images)
    for handle in handles:
        handle.remove()
    with model.capture_bn_inputs() as bn_inputs:
        captured_logits = model.teacher(images)
    assert [m for m, _ in bn_inputs] == layers and len(layers) == 2
    assert all(torch.equal(x, hooked[m]) for m, x in bn_inputs)
    student_logits = model.student(images)
    losses = model.generator_losses(student_logits, captured_logits, bn_inputs)
    s, t = student_logits.double(), teacher_logits.double()
    if discrepancy == "l1":
        naive = sum(abs(s[i, c] - t[i, c]) for i in range(16) for c in range(10)) / 160
    else:
        naive = naive_kl(s, t, 2.0)
    expected = {"adversarial": -0.7 * naive, "bn": 3.0 * naive_bn_prior([hooked[m] for m in layers], layers)}
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name].double(), value, rtol=1e-4, atol=1e-6)
        assert value.abs() > 1e-3, f"{name} is zero: the comparison proves nothing"
    student_losses = model.distillation_losses(None, type("Out", (), {"logits": student_logits})(),
                                               type("Out", (), {"logits": teacher_logits})())
    torch.testing.assert_close(student_losses[discrepancy].double(), naive, rtol=1e-4, atol=1e-6)
    # the generator's loss reaches the generator through both networks and the prior
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.generator.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_noise_baseline_trains_the_same_student_on_gaussian_noise():
    torch.manual_seed(0)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, generator="noise")
    student = snapshot(model.student)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=256, steps_per_epoch=1))
    assert model.generator is None and len(trainer.optimizers) == 1
    assert trainer.global_step == model.hparams.student_steps, "one training step of 5 student updates"
    assert "train/loss_generator" not in trainer.callback_metrics
    assert parameters_changed(student, model.student)
    noise = model.synthesize(4096)
    assert noise.shape == (4096, 1, 8, 8)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01


def test_generator_is_checkpointed_restored_and_not_exported(tmp_path):
    torch.manual_seed(0)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **SMALL_GENERATOR)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=8, steps_per_epoch=2))
    trainer.save_checkpoint(tmp_path / "method.ckpt")
    checkpoint = torch.load(tmp_path / "method.ckpt", weights_only=True)
    assert tuple(checkpoint["hyper_parameters"]["input_shape"]) == (1, 8, 8)
    assert len(checkpoint["optimizer_states"]) == 2
    generator_state = {f"generator.{k}": v for k, v in model.generator.state_dict().items()}
    assert generator_state and all(torch.equal(checkpoint["state_dict"][k], v) for k, v in generator_state.items())
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    model.export_student(tmp_path / "student.pt")
    assert set(torch.load(tmp_path / "student.pt", weights_only=True)) == set(model.student.state_dict())
    restored = DataFreeKD.load_from_checkpoint(tmp_path / "method.ckpt")
    for key, value in {**generator_state, **{f"student.{k}": v for k, v in model.student.state_dict().items()}}.items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_bad_input_is_a_clear_error():
    common = {"student": "cnn_tiny", "teacher": "cnn_small", "num_classes": 10, "in_chans": 1}
    with pytest.raises(ValueError, match="without labels.*drop ce_weight=1.0"):
        DataFreeKD(**common, ce_weight=1.0)
    with pytest.raises(ValueError, match="unknown generator='gan': choose one of dfad, noise"):
        DataFreeKD(**common, generator="gan")
    with pytest.raises(ValueError, match="unknown discrepancy='l2': choose one of l1, kl"):
        DataFreeKD(**common, discrepancy="l2")
    with pytest.raises(ValueError, match="student_steps must be at least 1"):
        DataFreeKD(**common, student_steps=0)
    with pytest.raises(ValueError, match=r"input shape must be \(channels, height, width\).*got \(64,\)"):
        DataFreeKD(**common, input_shape=(64,))
    mlp_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="no BatchNorm layer.*set bn_weight=0"):
        DataFreeKD(student="cnn_tiny", teacher=mlp_teacher, num_classes=10, in_chans=1)
    DataFreeKD(student="cnn_tiny", teacher=mlp_teacher, num_classes=10, in_chans=1, bn_weight=0.0)
    with pytest.raises(ValueError, match="batch_size and steps_per_epoch must be positive"):
        DataFreeDataModule(DigitsDataModule(), batch_size=0)
    model = DataFreeKD(**common, **SMALL_GENERATOR)
    no_validation = L.LightningDataModule.from_datasets(train_dataset=TensorDataset(torch.zeros(4, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"could not read the input shape.*pass input_shape=\(channels, height"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, DataFreeDataModule(no_validation, batch_size=4))


def test_digits_config_fits_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    monkeypatch.chdir(ROOT)
    teacher = tmp_path / "teacher.pt"
    torch.save(Supervised(student="cnn_small", num_classes=10, in_chans=1).student.state_dict(), teacher)
    cli = main(["fit", "--config", "configs/experiments/digits/datafree.yaml", "--trainer.max_epochs", "1",
                "--model.teacher_weights", str(teacher), "--data.init_args.steps_per_epoch", "2",
                "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
                "--seed_everything", "0"])
    assert isinstance(cli.model, DataFreeKD) and isinstance(cli.datamodule, DataFreeDataModule)
    assert cli.model.num_classes == 10 and cli.model.hparams.in_chans == 1
    real = cli.datamodule.datamodule  # built inside the data-free module: its own hyper-parameters, not the outer's
    assert (real.hparams.batch_size, real.hparams.test_fraction) == (64, 0.25) and cli.datamodule.hparams.batch_size == 128
    assert cli.model.generator.image_shape == (1, 8, 8)
    assert cli.trainer.global_step == 2 * (cli.model.hparams.student_steps + 1)


def test_data_free_beats_noise_on_digits():
    start = time.perf_counter()
    teacher = train_digits_teacher()
    noise_acc, teacher_acc = distil_on_digits(teacher, "noise")
    data_free_acc, _ = distil_on_digits(teacher, "dfad")
    print(f"teacher {teacher_acc:.4f}, noise baseline {noise_acc:.4f}, data-free {data_free_acc:.4f} "
          f"({time.perf_counter() - start:.1f} s)")
    assert teacher_acc > 0.9
    assert data_free_acc > noise_acc + 0.1


@pytest.mark.parametrize("defer", [False, True])
def test_a_non_finite_generator_loss_stops_training_naming_it(monkeypatch, defer):
    """The base's check, at once on the CPU and through the device-side record (as on accelerators)."""
    monkeypatch.setattr(DataFreeKD, "_defer_finite_check", staticmethod(lambda device: defer))
    original = DataFreeKD.generator_losses

    def poisoned(self, *args):
        losses = original(self, *args)
        return {**losses, "bn": losses["bn"] * float("nan")} if self.global_step >= 11 else losses

    monkeypatch.setattr(DataFreeKD, "generator_losses", poisoned)
    model = DataFreeKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    with pytest.raises(FloatingPointError, match=r"non-finite at global step 11.*non-finite losses: generator bn"):
        make_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=50).fit(
            model, DataFreeDataModule(DigitsDataModule(batch_size=64), batch_size=8, steps_per_epoch=3))
