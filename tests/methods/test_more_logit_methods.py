"""RLD, MLKD and Teacher-free KD train a few steps; each loss is its functional loss with the method's defaults."""

import pytest
import torch

from conftest import make_trainer
from lightning_kd.losses import kd_loss, standardize_logits
from lightning_kd.losses.logit_refined import mlkd_loss, rld_loss, virtual_teacher_loss, virtual_teacher_probs
from lightning_kd.methods.base import Batch, ModelOutput
from lightning_kd.methods.mlkd import MLKD
from lightning_kd.methods.rld import RLD
from lightning_kd.methods.tfkd import TfKDSelf, TfKDVirtual

# method, its teacher in the training test, the names of its losses
TRAINING = [(RLD, "cnn_small", "rld"), (MLKD, "cnn_small", "mlkd"), (TfKDSelf, "cnn_tiny", "kd"),
            (TfKDVirtual, None, "virtual")]


@pytest.mark.parametrize("method,teacher,loss_name", TRAINING, ids=[m.__name__ for m, _, _ in TRAINING])
def test_method_trains_and_logs_its_losses(method, teacher, loss_name, digits):
    model = method(student="cnn_tiny", teacher=teacher, num_classes=10, in_chans=1)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, digits)
    logged = trainer.callback_metrics
    for loss in ("", "_ce", f"_{loss_name}"):
        assert torch.isfinite(logged[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert logged[f"train/loss_{loss_name}"] > 0
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


def logits_pair(seed=0, batch=6, classes=10):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator) * 3, torch.randn(batch, classes, generator=generator) * 3,
            torch.randint(0, classes, (batch,), generator=generator))


def method_losses(model, student, teacher, target):
    return model.distillation_losses(Batch(torch.zeros(len(target)), target), ModelOutput(student),
                                     None if teacher is None else ModelOutput(teacher))


def at_epoch(monkeypatch, method, epoch):
    monkeypatch.setattr(method, "current_epoch", property(lambda self: epoch))


# --------------------------------------------------------------------------------------------------------- RLD
def test_rld_defaults_are_the_official_cifar_setting_and_warm_up_from_epoch_one(monkeypatch):
    model = RLD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.beta, hp.temperature, hp.confidence_temperature, hp.warmup_epochs, hp.ce_weight) == (
        1.0, 8.0, 4.0, None, 20, 1.0)
    student, teacher, target = logits_pair()
    full = rld_loss(student, teacher, target, 1.0, 8.0, 4.0)
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        at_epoch(monkeypatch, RLD, epoch)
        assert torch.allclose(method_losses(model, student, teacher, target)["rld"], ramp * full), f"epoch {epoch}"


def test_rld_passes_its_confidence_temperature():
    model = RLD(student="mlp", teacher="mlp", num_classes=10, in_chans=1, confidence_temperature=1.0,
                warmup_epochs=0)
    student, teacher, target = logits_pair(1)
    expected = rld_loss(student, teacher, target, 1.0, 8.0, 4.0, confidence_temperature=1.0)
    assert torch.allclose(method_losses(model, student, teacher, target)["rld"], expected)


# -------------------------------------------------------------------------------------------------------- MLKD
def test_mlkd_defaults_are_the_official_cifar_setting_and_loss_is_mlkd_loss():
    model = MLKD(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (tuple(hp.temperatures), hp.kd_weight, hp.ce_weight) == ((2.0, 3.0, 4.0, 5.0, 6.0), 0.9, 0.1)
    student, teacher, target = logits_pair()
    expected = 0.9 * mlkd_loss(student, teacher, (2.0, 3.0, 4.0, 5.0, 6.0))
    assert torch.allclose(method_losses(model, student, teacher, target)["mlkd"], expected)


@pytest.mark.parametrize("method", [RLD, MLKD, TfKDSelf])
def test_standardize_switch_applies_logit_standardization(method):
    model = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True)
    plain = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    student, teacher, target = logits_pair(2)
    got = method_losses(model, student, teacher, target)
    expected = method_losses(plain, standardize_logits(student), standardize_logits(teacher), target)
    scaled = method_losses(model, 5 * student + 2, 0.5 * teacher - 1, target)
    for name in got:
        assert torch.allclose(got[name], expected[name])
        assert torch.allclose(got[name], scaled[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ Tf-KD
def test_tfkd_self_is_kd_with_the_official_weights_and_reduction():
    model = TfKDSelf(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.temperature, hp.multiplier) == (0.95, 6.0, 50.0)
    assert hp.ce_weight == pytest.approx(0.05)
    student, teacher, target = logits_pair()
    # official: alpha * multiplier * T^2 * nn.KLDivLoss() of torch 1.2, the mean over the B * C entries
    entries = torch.nn.functional.kl_div(torch.log_softmax(student / 6, 1), torch.softmax(teacher / 6, 1),
                                         reduction="sum") / student.numel()
    official = 0.95 * 50.0 * 36 * entries
    loss = method_losses(model, student, teacher, target)["kd"]
    assert torch.allclose(loss, official, rtol=1e-5)
    assert torch.allclose(loss, 0.95 * 50.0 / 10 * kd_loss(student, teacher, 6.0))


def test_tfkd_cross_entropy_weight_follows_alpha_unless_given():
    assert TfKDSelf(student="mlp", teacher="mlp", num_classes=10, in_chans=1, alpha=0.9).hparams.ce_weight == (
        pytest.approx(0.1))
    assert TfKDVirtual(student="mlp", num_classes=10, in_chans=1, alpha=0.3, ce_weight=1.0).hparams.ce_weight == 1.0


def test_tfkd_virtual_needs_no_teacher_and_others_do():
    model = TfKDVirtual(student="mlp", num_classes=10, in_chans=1)
    assert model.teacher is None and not TfKDVirtual.requires_teacher
    for method in (RLD, MLKD, TfKDSelf):
        with pytest.raises(ValueError, match="needs a teacher"):
            method(student="mlp", num_classes=10, in_chans=1)


def test_tfkd_virtual_defaults_and_loss_are_the_official_regularization():
    model = TfKDVirtual(student="mlp", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.alpha, hp.temperature, hp.multiplier, hp.correct_prob) == (0.1, 20.0, 100.0, 0.99)
    assert hp.ce_weight == pytest.approx(0.9)
    student, _, target = logits_pair()
    loss = method_losses(model, student, None, target)["virtual"]
    assert torch.allclose(loss, 0.1 * 100.0 / 10 * virtual_teacher_loss(student, target, 0.99, 20.0))
    # official: alpha * multiplier * nn.KLDivLoss()(log_softmax(s), softmax(p_d / T)), a mean over the B * C entries
    designed = virtual_teacher_probs(target, 10, 0.99)
    entries = torch.nn.functional.kl_div(torch.log_softmax(student, 1), torch.softmax(designed / 20.0, 1),
                                         reduction="sum") / student.numel()
    official = 0.1 * 100.0 * entries
    assert torch.allclose(loss, official, rtol=1e-5)


def test_tfkd_virtual_teacher_distribution_by_hand():
    # 2 samples x 3 classes, labels (1, 0), a = 0.9: the designed teacher is 0.9 on the label, 0.05 elsewhere;
    # softened at T = 2 as softmax(p_d / 2): label e^0.45 / (e^0.45 + 2 e^0.025), others e^0.025 / (same)
    designed = virtual_teacher_probs(torch.tensor([1, 0]), 3, correct_prob=0.9)
    torch.testing.assert_close(designed, torch.tensor([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]]))
    z = torch.tensor(0.45).exp() + 2 * torch.tensor(0.025).exp()
    high, low = (torch.tensor(0.45).exp() / z).item(), (torch.tensor(0.025).exp() / z).item()
    softened = torch.tensor([[low, high, low], [high, low, low]])
    model = TfKDVirtual(student="mlp", num_classes=3, in_chans=1, correct_prob=0.9, temperature=2.0, alpha=0.5,
                        multiplier=3.0)
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    log_p_s = torch.log_softmax(student, dim=1)
    by_hand = (softened * (softened.log() - log_p_s)).sum(dim=1).mean()
    loss = method_losses(model, student, None, torch.tensor([1, 0]))["virtual"]
    assert loss.item() == pytest.approx(0.5 * 3.0 / 3 * by_hand.item(), rel=1e-5)


def test_tfkd_virtual_with_a_teacher_only_measures_it(digits):
    model = TfKDVirtual(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, digits)
    assert {k for k in trainer.callback_metrics if k.startswith("train/loss_")} == {"train/loss_ce",
                                                                                  "train/loss_virtual"}
    (validated,) = trainer.validate(model, digits, verbose=False)
    assert {"val/acc", "val/agreement", "val/teacher_acc", "val/kl"} <= set(validated)


@pytest.mark.parametrize("method,teacher", [(TfKDSelf, "cnn_tiny"), (TfKDVirtual, None)])
def test_tfkd_restores_from_a_checkpoint(method, teacher, digits, tmp_path):
    model = method(student="cnn_tiny", teacher=teacher, num_classes=10, in_chans=1, alpha=0.8, temperature=3.0)
    trainer = make_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "method.ckpt")
    restored = method.load_from_checkpoint(tmp_path / "method.ckpt")
    assert restored.hparams.ce_weight == pytest.approx(0.2)
    assert (restored.hparams.alpha, restored.hparams.temperature) == (0.8, 3.0)
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, restored.student.state_dict()[key])
