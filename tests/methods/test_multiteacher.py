"""MultiTeacherKD: combination rules against naive formulas, frozen teachers through fit, teachers with their own
input size and normalisation, checkpoints, clear errors, and a two-process DDP run."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import assert_matches_naive, make_trainer, random_loader
from lightning_kd.data.mixing import Mixing
from lightning_kd.losses import kd_loss
from lightning_kd.methods import Batch, ModelOutput
from lightning_kd.methods.multiteacher import MultiTeacherKD, MultiTeacherOutput, combine_teachers, confidence_weights
from lightning_kd.models import create_model

ROOT = Path(__file__).resolve().parents[2]


def logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def naive_confidence(teacher_logits, target):
    """CA-MKD's weights, one sample and one teacher at a time."""
    num_teachers, batch, _ = teacher_logits.shape
    weights = torch.empty(num_teachers, batch, dtype=torch.float64)
    for i in range(batch):
        ce = []
        for k in range(num_teachers):
            p = teacher_logits[k, i].softmax(-1)
            ce.append(-sum(target[i, c] * math.log(p[c]) for c in range(len(p))) if target.dim() == 2
                      else -math.log(p[target[i]]))
        total = sum(math.exp(v) for v in ce)
        for k in range(num_teachers):
            weights[k, i] = (1 - math.exp(ce[k]) / total) / (num_teachers - 1)
    return weights


def naive_multi_kd(student, teacher_logits, weights, temperature):
    """T² · mean_i KL(Σ_k w_ki softmax(z_ki / T) ‖ softmax(s_i / T)), with loops over samples and classes."""
    total = 0.0
    for i in range(student.shape[0]):
        mixture = sum(weights[k, i] * (teacher_logits[k, i] / temperature).softmax(-1)
                      for k in range(teacher_logits.shape[0]))
        log_q = (student[i] / temperature).log_softmax(-1)
        total = total + sum(mixture[c] * (mixture[c].log() - log_q[c]) for c in range(student.shape[1]))
    return temperature ** 2 * total / student.shape[0]


# ------------------------------------------------------------------------------------------- pure functions
def test_confidence_weights_match_the_naive_formula():
    z = logits(3, 5, 6)
    target = torch.tensor([0, 5, 2, 2, 1])
    weights = confidence_weights(z.float(), target)
    torch.testing.assert_close(weights.double(), naive_confidence(z, target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(0), torch.ones(5))
    soft = torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    soft = soft / soft.sum(-1, keepdim=True)
    torch.testing.assert_close(confidence_weights(z.float(), soft.float()).double(), naive_confidence(z, soft),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(confidence_weights(z[:1].float(), target), torch.ones(1, 5))


def test_confidence_weights_hand_computed():
    # teacher 0 gives the label probability 1/2 (CE ln 2), teacher 1 gives 1/4 (CE ln 4): softmax of the CEs is
    # (2/6, 4/6), so the weights are (1 − 1/3, 1 − 2/3) = (2/3, 1/3)
    z = torch.log(torch.tensor([[[1.0, 1.0]], [[1.0, 3.0]]]))
    torch.testing.assert_close(confidence_weights(z, torch.tensor([0])), torch.tensor([[2 / 3], [1 / 3]]))


def test_combined_teacher_is_the_log_of_the_weighted_softened_mixture():
    z = logits(3, 4, 5)
    weights = torch.tensor([[0.2, 0.5, 0.0, 1.0], [0.3, 0.25, 0.5, 0.0], [0.5, 0.25, 0.5, 0.0]])
    expected = torch.stack([sum(weights[k, i] * (z[k, i] / 2.0).softmax(-1) for k in range(3)) for i in range(4)])
    combined = combine_teachers(z.float(), weights, 2.0)
    assert torch.isfinite(combined).all()
    torch.testing.assert_close(combined.double().exp(), expected, rtol=1e-5, atol=1e-7)
    per_teacher = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(combine_teachers(z.float(), per_teacher, 2.0),
                               combine_teachers(z.float(), per_teacher.view(3, 1).expand(3, 4), 2.0))


def test_multi_teacher_loss_hand_computed():
    # T = 1, mean of (1/4, 3/4) and (3/4, 1/4) is (1/2, 1/2); the student says (1/4, 3/4):
    # KL = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
    z = torch.log(torch.tensor([[[1.0, 3.0]], [[3.0, 1.0]]]))
    target = combine_teachers(z, torch.full((2,), 0.5), 1.0)
    assert kd_loss(torch.log(torch.tensor([[1.0, 3.0]])), target, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3))


# ----------------------------------------------------------------------------------------------- the method
def method_loss(model, student, teacher_logits, target):
    batch = Batch(torch.zeros(len(target), 1, 8, 8), target)
    weights = model.combination_weights(teacher_logits, target)
    out = MultiTeacherOutput(combine_teachers(teacher_logits, weights, 1.0), {}, teacher_logits, weights)
    return model.distillation_losses(batch, ModelOutput(student), out)["kd"]


@pytest.mark.parametrize("combine", ["mean", "fixed", "confidence"])
def test_loss_matches_the_naive_formula_in_value_and_gradient(combine):
    extra = {"combine_weights": [1.0, 3.0, 0.0]} if combine == "fixed" else {}
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_tiny"] * 3, num_classes=6, in_chans=1,
                           combine=combine, temperature=3.0, kd_weight=0.5, **extra)
    z, target = logits(3, 5, 6, seed=2), torch.tensor([0, 5, 2, 2, 1])
    weights = {"mean": torch.full((3, 5), 1 / 3, dtype=torch.float64),
               "fixed": torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64).view(3, 1).expand(3, 5),
               "confidence": naive_confidence(z, target)}[combine]
    assert_matches_naive(lambda s: method_loss(model, s, z.float(), target),
                         lambda s: 0.5 * naive_multi_kd(s, z, weights, 3.0), logits(5, 6, seed=3))


def test_gradient_is_that_of_the_weighted_per_teacher_kl():
    """The papers' Σ_k w_k KL(teacher k ‖ student) and KD on the mixture differ by a constant only."""
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_tiny"] * 3, num_classes=6, in_chans=1,
                           combine="confidence")
    z, target = logits(3, 5, 6, seed=4).float(), torch.tensor([1, 1, 0, 3, 5])
    s = logits(5, 6, seed=5).float().requires_grad_(True)
    weights = confidence_weights(z, target)
    (ours,) = torch.autograd.grad(method_loss(model, s, z, target), s)
    log_q = F.log_softmax(s / 4.0, -1)
    per_teacher = sum((weights[k] * F.kl_div(log_q, F.softmax(z[k] / 4.0, -1), reduction="none").sum(-1)).mean()
                      for k in range(3)) * 16.0
    (papers,) = torch.autograd.grad(per_teacher, s)
    torch.testing.assert_close(ours, papers, rtol=1e-4, atol=1e-6)


def test_one_teacher_is_kd():
    multi = MultiTeacherKD(student="cnn_tiny", teacher="cnn_small", num_classes=6, in_chans=1, kd_weight=0.9)
    z, s, target = logits(1, 5, 6, seed=6).float(), logits(5, 6, seed=7).float(), torch.tensor([0, 1, 2, 3, 4])
    assert len(multi.teacher) == 1 and multi.hparams.teacher == "cnn_small"
    expected = 0.9 * kd_loss(s, z[0], 4.0)
    for combine in ("mean", "confidence"):
        multi.hparams.combine = combine
        torch.testing.assert_close(method_loss(multi, s, z, target), expected)


def test_confidence_weights_use_the_mixed_labels_on_a_mixed_batch():
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_tiny", "cnn_small"], num_classes=6, in_chans=1,
                           combine="confidence")
    z, target = logits(2, 4, 6, seed=8).float(), torch.tensor([0, 1, 2, 3])
    model.mixing = Mixing(0.6, torch.tensor([3, 0, 1, 2]))
    expected = confidence_weights(z, model.mixing.mix_targets(target, 6))
    torch.testing.assert_close(model.combination_weights(z, target), expected)
    assert not torch.allclose(expected, confidence_weights(z, target))


# --------------------------------------------------------------------------------------- frozen teachers
class TeacherModes(Callback):
    """Records each teacher's mode as seen from inside its forward, at every step."""

    def __init__(self):
        self.modes: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        for teacher in pl_module.teacher:
            teacher.register_forward_pre_hook(lambda module, args: self.modes.append(module.training))


class SwitchToTrainMode(Callback):
    """Puts one teacher in train mode before every step, as user code might."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.teacher[1].train()


def test_every_teacher_stays_frozen_bit_identical_and_in_eval_through_fit(digits, teacher_in_train_mode):
    second = create_model("cnn_tiny", num_classes=10, in_chans=1)
    assert second.training
    model = MultiTeacherKD(student="cnn_tiny", teacher=[teacher_in_train_mode, second], num_classes=10, in_chans=1,
                           combine="confidence", mix="mixup")
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in (teacher_in_train_mode, second)]
    modes = TeacherModes()
    make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                 callbacks=[modes, SwitchToTrainMode()]).fit(model, digits)
    assert len(modes.modes) >= 2 * 8 and not any(modes.modes), "a teacher ran in train mode"
    for teacher, state in zip(model.teacher, before):
        assert teacher.training is False and all(not p.requires_grad for p in teacher.parameters())
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, state[key]), f"teacher {key} changed during fit"
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.student.parameters()}


def test_teachers_may_differ_in_input_size_and_normalisation(digits):
    torch.manual_seed(0)
    specs = [None, {"size": 16}, {"size": [12, 10], "mean": 0.5, "std": 0.25, "interpolation": "nearest"}]
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_small", "cnn_tiny", "cnn_small"], num_classes=10,
                           in_chans=1, teacher_inputs=specs, data_mean=0.3, data_std=0.2)
    seen = {}
    for i, teacher in enumerate(model.teacher):
        teacher.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, args[0]))
    x = torch.randn(4, 1, 8, 8)
    model.forward_teacher(Batch(x, torch.arange(4)))
    assert torch.equal(seen[0], x)
    torch.testing.assert_close(seen[1], F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    raw = F.interpolate(x, size=(12, 10), mode="nearest") * 0.2 + 0.3  # back to the data's scale ...
    torch.testing.assert_close(seen[2], (raw - 0.5) / 0.25)  # ... then the teacher's normalisation
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, digits)
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])


def test_channels_last_and_compile_reach_every_teacher(digits, monkeypatch):
    """Each teacher gets channels-last weights and inputs (also after its own resize) and is compiled on its own
    (``torch.compile`` replaced by a recording wrapper: compiling for real takes minutes on a CPU)."""
    compiled, calls = [], []

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return lambda x: (calls.append(model), model(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_small", "cnn_tiny"], num_classes=10, in_chans=1,
                           teacher_inputs=[None, {"size": 16}], channels_last=True, compile=True)
    layouts = []
    for teacher in model.teacher:
        teacher.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    make_trainer(max_steps=1, limit_val_batches=0).fit(model, digits)
    assert compiled[0] is model.student and compiled[1:] == list(model.teacher)
    assert calls == [model.teacher[0], model.teacher[1], model.student]  # the teachers' forwards, then the student's
    assert layouts == [True, True]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.teacher.parameters() if p.dim() == 4)


def test_validation_measures_the_combined_teacher(digits):
    torch.manual_seed(0)
    teachers = [create_model("cnn_small", num_classes=10, in_chans=1).eval() for _ in range(2)]
    model = MultiTeacherKD(student="cnn_tiny", teacher=teachers, num_classes=10, in_chans=1)
    metrics = make_trainer().validate(model, digits, verbose=False)[0]
    images, targets = digits.datasets["val"].tensors
    with torch.no_grad():
        ensemble = sum(t(images).softmax(-1) for t in teachers) / 2
    assert metrics["val/teacher_acc"] == pytest.approx((ensemble.argmax(-1) == targets).float().mean().item(), abs=1e-6)


# --------------------------------------------------------------------------------------- out of the box

@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
def test_trains_out_of_the_box(pair, digits):
    torch.manual_seed(0)
    if pair == "digits":
        model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_small", "cnn_tiny"], num_classes=10, in_chans=1)
        data = {"datamodule": digits}
    elif pair == "resnet":
        model = MultiTeacherKD(student="resnet8x4", teacher=["resnet32x4", "wrn_40_2"], num_classes=100,
                               combine="confidence")
        data = {"train_dataloaders": random_loader(100)}
    else:
        model = MultiTeacherKD(student="timm:resnet10t", teacher=["timm:resnet18", "timm:resnet10t"], num_classes=10,
                               combine="fixed", combine_weights=[2.0, 1.0])
        data = {"train_dataloaders": random_loader(10)}
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for key in ("train/loss", "train/loss_ce", "train/loss_kd"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


def test_checkpoint_leaves_teachers_out_and_rebuilds_them_from_names_and_files(tmp_path, digits):
    torch.manual_seed(0)
    files = []
    for i, name in enumerate(["cnn_small", "cnn_tiny"]):
        files.append(str(tmp_path / f"teacher{i}.pt"))
        torch.save({"model": create_model(name, num_classes=10, in_chans=1).state_dict()}, files[-1])
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_small", "cnn_tiny"], teacher_weights=files,
                           num_classes=10, in_chans=1, combine="confidence")
    for teacher, path in zip(model.teacher, files):
        for key, value in torch.load(path)["model"].items():
            assert torch.equal(teacher.state_dict()[key], value)
    trainer = make_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)
    restored = MultiTeacherKD.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.hparams.combine == "confidence" and len(restored.teacher) == 2
    for a, b in ((restored.student, model.student), (restored.teacher, model.teacher)):
        for key, value in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], value), key
    model.export_student(tmp_path / "student.pt")
    assert set(torch.load(tmp_path / "student.pt")) == set(model.student.state_dict())


# ------------------------------------------------------------------------------------------------- errors
def test_bad_input_is_a_clear_error(tmp_path):
    common = dict(student="cnn_tiny", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="teacher_weights has 1 entries for 2 teachers"):
        MultiTeacherKD(teacher=["cnn_small", "cnn_tiny"], teacher_weights=["a.pt"], **common)
    with pytest.raises(ValueError, match="needs teachers"):
        MultiTeacherKD(teacher=[], **common)
    with pytest.raises(ValueError, match=r"teacher 1 \(SimpleCNN\) has 5 classes but num_classes is 10"):
        MultiTeacherKD(teacher=["cnn_small", create_model("cnn_tiny", num_classes=5, in_chans=1)], **common)
    with pytest.raises(ValueError, match="combine_weights go with combine='fixed'"):
        MultiTeacherKD(teacher=["cnn_small", "cnn_tiny"], combine_weights=[1, 2], **common)
    with pytest.raises(ValueError, match="must be 2 non-negative numbers"):
        MultiTeacherKD(teacher=["cnn_small", "cnn_tiny"], combine="fixed", combine_weights=[1, -1], **common)
    with pytest.raises(ValueError, match="unknown combine='vote'"):
        MultiTeacherKD(teacher=["cnn_small", "cnn_tiny"], combine="vote", **common)
    with pytest.raises(ValueError, match=r"teacher_inputs\[0\] has unknown keys resize"):
        MultiTeacherKD(teacher=["cnn_small"], teacher_inputs=[{"resize": 16}], **common)
    with pytest.raises(ValueError, match=r"teacher_inputs\[0\]: unknown interpolation 'cubic'"):
        MultiTeacherKD(teacher=["cnn_small"], teacher_inputs=[{"size": 16, "interpolation": "cubic"}], **common)
    with pytest.raises(ValueError, match="data_mean has 3 values for 1 input channels"):
        MultiTeacherKD(teacher=["cnn_small"], teacher_inputs=[{"mean": 0.5, "std": 0.2}], data_mean=[0.1, 0.2, 0.3],
                       data_std=0.2, **common)
    with pytest.raises(ValueError, match="pass data_mean and data_std"):
        MultiTeacherKD(teacher=["cnn_small"], teacher_inputs=[{"mean": 0.5, "std": 0.2}], **common)
    with pytest.raises(ValueError, match=r"teacher_weights\[1\] .* does not fit the teacher 1"):
        torch.save(create_model("cnn_small", num_classes=10, in_chans=1).state_dict(), tmp_path / "small.pt")
        MultiTeacherKD(teacher=["cnn_small", "cnn_tiny"], teacher_weights=[None, str(tmp_path / "small.pt")], **common)
    headless = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    model = MultiTeacherKD(teacher=["cnn_small", headless], **common)
    with pytest.raises(ValueError, match=r"teacher 1 \(Sequential\) has 7 classes but num_classes is 10"):
        model.forward_teacher(Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_two_process_ddp_on_cpu_trains_and_logs(tmp_path):
    files = []
    for i, name in enumerate(["cnn_small", "cnn_tiny"]):
        files.append(str(tmp_path / f"teacher{i}.pt"))
        torch.save(create_model(name, num_classes=10, in_chans=1).state_dict(), files[-1])
    command = [sys.executable, "-m", "lightning_kd", "fit", "--data", str(ROOT / "configs/data/digits.yaml"),
               "--trainer", str(ROOT / "configs/trainer/cpu_quick.yaml"),
               "--model", "lightning_kd.methods.multiteacher.MultiTeacherKD", "--model.student", "cnn_tiny",
               "--model.teacher", "[cnn_small, cnn_tiny]", "--model.teacher_weights", f"[{files[0]}, {files[1]}]",
               "--model.combine", "confidence", "--model.mix", "cutmix",
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
               "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    train = [r for r in rows if r.get("train/loss_kd")]
    val = [r for r in rows if r.get("val/teacher_acc")]
    assert len(train) == 3 and all(math.isfinite(float(r["train/loss_kd"])) for r in train)
    assert len(val) == 1 and 0 <= float(val[0]["val/agreement"]) <= 1


def test_standardize_z_scores_each_teacher_before_they_are_combined():
    """Logit standardization (Sun et al., CVPR 2024) applies to each teacher and the student, not to the mixture."""
    model = MultiTeacherKD(student="cnn_tiny", teacher=["cnn_tiny"] * 2, num_classes=6, in_chans=1,
                           temperature=2.0, kd_weight=0.5, standardize=True)
    z, target = logits(2, 5, 6, seed=8), torch.tensor([0, 1, 2, 3, 4])

    def z_score(x):  # over classes, unbiased std, as the paper's code
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7)

    weights = torch.full((2, 5), 0.5, dtype=torch.float64)
    assert_matches_naive(lambda s: method_loss(model, s, z.float(), target),
                         lambda s: 0.5 * naive_multi_kd(z_score(s), z_score(z), weights, 2.0), logits(5, 6, seed=9))
