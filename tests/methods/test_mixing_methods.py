"""Consistent teaching (``mix``): teacher and student see one mixed batch, the losses are the functional ones on it
with mixed labels for the cross-entropy, evaluation is unmixed, and every logit method trains with it."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from conftest import make_trainer
from lightning_kd.losses import dist_loss, dkd_loss, kd_loss
from lightning_kd.methods import DIST, DKD, KD, InitPhaseDistillation, get_method, list_methods
from lightning_kd.terms import ATTerm, KDTerm


class StepRecorder(Callback):
    """Per step: the batch the loader gave, what student and teacher received and returned, and the mixing."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        def record(role):
            def hook(module, args, output):
                self.steps[-1].update({f"{role}_in": args[0].detach().clone(), f"{role}_out": output.detach().clone(),
                                       f"{role}_mixing": pl_module.mixing})
            return hook

        pl_module.student.register_forward_hook(record("student"))
        pl_module.teacher.register_forward_hook(record("teacher"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"stage": "train", "input": batch[0].clone(), "target": batch[1].clone()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.steps.append({"stage": "val", "input": batch[0].clone(), "target": batch[1].clone()})


def naive_mix(x, mixing):
    """The mixed batch from its definition, one image at a time."""
    out = x.clone()
    for i, j in enumerate(mixing.partner.tolist()):
        if mixing.box is None:
            out[i] = mixing.lam * x[i] + (1 - mixing.lam) * x[j]
        else:
            top, left, height, width = mixing.box
            out[i, :, top:top + height, left:left + width] = x[j, :, top:top + height, left:left + width]
    return out


EXPECTED = {
    "KD": lambda s, t, y: {"kd": 0.9 * kd_loss(s, t, 4.0)},
    "DIST": lambda s, t, y: {"dist": dist_loss(s, t, 2.0, 2.0, 4.0)},
    # epoch 0 of a 20-epoch warm-up; the labels are those of the image with the larger share
    "DKD": lambda s, t, y: {"dkd": dkd_loss(s, t, y, 1.0, 8.0, 4.0) / 20},
}
METHODS = {"KD": KD, "DIST": DIST, "DKD": DKD}


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_teacher_and_student_see_one_mixed_batch_and_losses_are_the_functional_ones(name, mode, digits):
    torch.manual_seed(0)
    model = METHODS[name](student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix=mode)
    recorder = StepRecorder()
    trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, digits)
    step, = recorder.steps
    mixing = step["student_mixing"]
    assert mixing is not None and step["teacher_mixing"] is mixing and model.mixing is None
    assert (mixing.box is None) == (mode == "mixup") and mixing.lam >= 0.5
    assert torch.equal(step["student_in"], step["teacher_in"]), "teacher and student must see the same view"
    torch.testing.assert_close(step["student_in"], naive_mix(step["input"], mixing))
    assert not torch.equal(step["student_in"], step["input"])

    s, t, y = step["student_out"], step["teacher_out"], step["target"]
    logged = trainer.callback_metrics
    s64 = s.double()
    ce = mixing.lam * F.cross_entropy(s64, y) + (1 - mixing.lam) * F.cross_entropy(s64, y[mixing.partner])
    assert logged["train/loss_ce"].item() == pytest.approx(model.hparams.ce_weight * ce.item(), rel=1e-5)
    for key, value in EXPECTED[name](s, t, y).items():
        assert logged[f"train/loss_{key}"].item() == pytest.approx(value.item(), rel=1e-5), key


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


# mixing is the base's: every method mixes, except those whose batches are not labelled images (DataFreeKD's are
# generated, LanguageModelKD's are tokens) and MLKD, whose strong view is not mixed with the weak one (it refuses)
MIXED_METHODS = [name for name in list_methods() if name not in ("DataFreeKD", "LanguageModelKD", "MLKD")]


@pytest.mark.parametrize("name", MIXED_METHODS)
def test_every_method_trains_with_mixing(name, digits):
    torch.manual_seed(0)
    extra = {"terms": {"kd": KDTerm(), "at": ATTerm(student_layers=["stages.1"], teacher_layers=["stages.1"])}} \
        if name == "Distiller" else {}
    batches = {}
    if issubclass(get_method(name), InitPhaseDistillation):  # one step of the init phase, then one on mixed batches
        extra["init_epochs"], batches["limit_train_batches"] = 1, 1
    model = get_method(name)(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="cutmix",
                             **extra)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=2, limit_val_batches=0, **batches)
    trainer.fit(model, digits)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


def test_mix_is_recorded_and_restored_from_checkpoints(tmp_path, digits):
    model = DKD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup", mix_alpha=0.4)
    trainer = make_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = DKD.load_from_checkpoint(tmp_path / "last.ckpt")
    assert (restored.hparams.mix, restored.hparams.mix_alpha) == ("mixup", 0.4)


class CachedTeacher(Callback):
    def on_fit_start(self, trainer, pl_module):
        pl_module.replay_teacher = lambda batch: torch.zeros(len(batch.target), 10)


def test_bad_mix_options_are_clear_errors(digits):
    with pytest.raises(ValueError, match="unknown mix='mixupp'"):
        KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixupp")
    with pytest.raises(ValueError, match="mix_alpha=0.0 must be positive"):
        KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup", mix_alpha=0.0)
    model = KD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix="mixup")
    with pytest.raises(ValueError, match="replayed from a cache"):
        make_trainer(max_steps=1, limit_val_batches=0, callbacks=[CachedTeacher()]).fit(model, digits)
