"""Every method trains a few steps; each logit method's loss is its functional loss with the method's defaults."""

import math

import pytest
import torch

from conftest import make_trainer
from lightning_kd.losses import dist_loss, dkd_loss, kd_loss, normkd_loss, standardize_logits
from lightning_kd.terms import KDTerm
from lightning_kd.methods import (CTKD, DIST, DKD, KD, MLKD, RLD, Batch, InitPhaseDistillation, ModelOutput, NormKD,
                                  Supervised, TfKDSelf, get_method, list_methods)

LOSS_NAMES = {"Supervised": set(), "KD": {"kd"}, "DKD": {"dkd"}, "DIST": {"dist"}, "CTKD": {"kd"}, "NormKD": {"kd"},
              "RLD": {"rld"}, "MLKD": {"mlkd"}, "TfKDSelf": {"kd"}, "TfKDVirtual": {"virtual"}}


def test_registry_lists_every_logit_method():
    assert set(LOSS_NAMES) <= set(list_methods())
    assert get_method("DKD") is DKD


# DataFreeKD (no training data) and LanguageModelKD (token batches) have their own tests
@pytest.mark.parametrize("name", [n for n in list_methods() if n not in ("DataFreeKD", "LanguageModelKD")])
def test_every_method_trains_and_logs_its_losses(name, digits):
    # FT's initialisation phase trains the paraphraser alone (built here from the input shape): it must change
    extra = {"input_shape": (1, 8, 8)} if name == "FT" else {"terms": {"kd": KDTerm()}} if name == "Distiller" else {}
    model = get_method(name)(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, **extra)
    trained = model if name == "FT" else model.student
    before = {k: v.clone() for k, v in trained.state_dict().items() if not k.startswith("teacher.")}
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, digits)
    logged = trainer.callback_metrics
    # methods with an initialisation phase spend their first epochs on its loss alone
    prefix = "train/init_loss" if isinstance(model, InitPhaseDistillation) else "train/loss"
    for loss in {""} if prefix == "train/init_loss" else {"", "_ce"} | {f"_{n}" for n in LOSS_NAMES.get(name, set())}:
        assert torch.isfinite(logged[f"{prefix}{loss}"]), f"{prefix}{loss} missing or not finite"
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in before.items())


def logits_pair(seed=0, batch=6, classes=10):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator) * 3, torch.randn(batch, classes, generator=generator) * 3,
            torch.randint(0, classes, (batch,), generator=generator))


def method_losses(model, student, teacher, target):
    return model.distillation_losses(Batch(torch.zeros(len(target)), target), ModelOutput(student),
                                     ModelOutput(teacher))


def test_kd_defaults_are_the_papers_and_loss_is_kd_loss():
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.temperature, model.hparams.ce_weight, model.hparams.kd_weight) == (4.0, 0.1, 0.9)
    student, teacher, target = logits_pair()
    loss = method_losses(model, student, teacher, target)["kd"]
    assert torch.allclose(loss, 0.9 * kd_loss(student, teacher, 4.0))


def test_standardize_switch_applies_logit_standardization():
    model = KD(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True, temperature=2.0)
    student, teacher, target = logits_pair()
    loss = method_losses(model, student, teacher, target)["kd"]
    expected = 0.9 * kd_loss(standardize_logits(student), standardize_logits(teacher), 2.0)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, 0.9 * kd_loss(student, teacher, 2.0))


@pytest.mark.parametrize("method", [KD, DKD, DIST, CTKD, NormKD, RLD, MLKD, TfKDSelf])
def test_standardize_makes_the_loss_invariant_to_logit_scale(method):
    model = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True)
    student, teacher, target = logits_pair(1)
    plain = method_losses(model, student, teacher, target)
    scaled = method_losses(model, 5 * student + 2, 0.5 * teacher - 1, target)
    for name in plain:
        assert torch.allclose(plain[name], scaled[name], rtol=1e-4, atol=1e-6)


def at_epoch(monkeypatch, method, epoch):
    monkeypatch.setattr(method, "current_epoch", property(lambda self: epoch))


def test_dkd_warms_up_linearly_over_epochs_counted_from_one(monkeypatch):
    model = DKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.alpha, model.hparams.beta, model.hparams.temperature, model.hparams.warmup_epochs) == (
        1.0, 8.0, 4.0, 20)
    student, teacher, target = logits_pair()
    full = dkd_loss(student, teacher, target, 1.0, 8.0, 4.0)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        at_epoch(monkeypatch, DKD, epoch)
        loss = method_losses(model, student, teacher, target)["dkd"]
        assert torch.allclose(loss, ramp * full), f"epoch {epoch}"


def test_dist_defaults_are_the_cifar_setting():
    model = DIST(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    assert (model.hparams.beta, model.hparams.gamma, model.hparams.temperature, model.hparams.ce_weight) == (
        2.0, 2.0, 4.0, 1.0)
    student, teacher, target = logits_pair()
    assert torch.allclose(method_losses(model, student, teacher, target)["dist"], dist_loss(student, teacher, 2, 2, 4))


def test_normkd_uses_normkd_loss():
    model = NormKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    student, teacher, target = logits_pair()
    expected = model.hparams.kd_weight * normkd_loss(student, teacher, model.hparams.temperature_scale)
    assert torch.allclose(method_losses(model, student, teacher, target)["kd"], expected)


def test_ctkd_temperature_is_trained_adversarially_within_its_range(digits, monkeypatch):
    model = CTKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, lambda_epochs=1)
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(model.temperature) in optimized, "the learnable temperature must be optimized with the student"
    student, teacher, target = logits_pair()
    at_epoch(monkeypatch, CTKD, 5)  # past the curriculum: full gradient reversal
    loss = method_losses(model, student.requires_grad_(), teacher, target)["kd"]
    loss.backward()
    initial = 1 + 20 / (1 + math.exp(-1.0))
    temperature = torch.tensor(initial, requires_grad=True)
    (0.9 * kd_loss(student.detach(), teacher, temperature)).backward()
    d_temperature_d_theta = 20 * math.exp(-1.0) / (1 + math.exp(-1.0)) ** 2
    # gradient reversal: theta's gradient is the negative of the true one, so SGD ascends the KD loss
    expected = -temperature.grad.item() * d_temperature_d_theta
    assert model.temperature.grad.item() == pytest.approx(expected, rel=1e-4)
    monkeypatch.undo()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, digits)
    assert 1.0 <= trainer.callback_metrics["train/temperature"].item() <= 21.0


def test_supervised_needs_no_teacher_and_smooths_labels():
    model = Supervised(student="mlp", num_classes=10, in_chans=1, label_smoothing=0.1)
    student, _, target = logits_pair()
    expected = torch.nn.functional.cross_entropy(student, target, label_smoothing=0.1)
    assert torch.allclose(model.cross_entropy(student, target), expected)
    assert model.teacher is None
