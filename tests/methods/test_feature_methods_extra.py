"""VID, FSP, AB and FT: train out of the box on three model families, losses equal the functional losses on hooked
features, adapters are built from inferred shapes, optimized in their phase, checkpointed, restored and never
exported; the init phase of FSP, AB and FT optimizes only its own parts, switches inside one fit, and resumes."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import assert_parts_checkpointed, hooked_features, make_trainer, random_loader, snapshot
from lightning_kd.data import DigitsDataModule
from lightning_kd.losses.feature import ab_loss, fsp_loss, fsp_matrix, ft_loss, vid_loss
from lightning_kd.methods.ab import AB
from lightning_kd.methods.base import Batch
from lightning_kd.methods.fsp import FSP
from lightning_kd.methods.ft import FT
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.methods.vid import VID
from lightning_kd.nn.adapters import Paraphraser, Translator, VIDRegressor, boundary_connector, channel_connector
from lightning_kd.nn.projectors import ConvBN, ConvReg

METHODS = {"VID": VID, "FSP": FSP, "AB": AB, "FT": FT}
INIT_METHODS = ["FSP", "AB", "FT"]
#: the losses logged in the init phase and after it
INIT_LOSSES = {"FSP": {"fsp"}, "AB": {"ab"}, "FT": {"reconstruction"}}
MAIN_LOSSES = {"VID": {"vid"}, "FSP": set(), "AB": set(), "FT": {"ft"}}
#: the trainable parts of each method (attribute names)
PARTS = {"VID": ["regressors"], "FSP": ["connectors"], "AB": ["connectors"], "FT": ["paraphraser", "translator"]}

ZOO_LAYERS = {"VID": ["layer1", "layer2", "layer3"], "FSP": ["relu", "layer1", "layer2", "layer3"],
              "FT": ["layer3"]}
TIMM_LAYERS = {"VID": ["layer1", "layer2", "layer3", "layer4"], "FSP": ["act1", "layer1", "layer2", "layer3", "layer4"],
               "FT": ["layer4"]}


def build(name: str, **kwargs):
    """The method with a one-epoch init phase where it has one."""
    if name in INIT_METHODS:
        kwargs.setdefault("init_epochs", 1)
    return METHODS[name](**kwargs)




def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def parameter_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


class OptimizedParameters(Callback):
    """Records, for every training step, the parameters the optimizer holds and its learning rate."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.params.append({id(p) for group in groups for p in group["params"]})
        self.lrs.append(groups[0]["lr"])


# ------------------------------------------------------------------------------------------------ out of the box
@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(METHODS))
def test_trains_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    if pair == "digits":
        model = build(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        data = {"datamodule": digits}
    elif pair == "resnet":
        model = build(name, student="resnet8x4", teacher="resnet32x4", num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
        if name == "AB":
            assert model.student_layers == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"]
            assert model.teacher_layers == ["layer1.4.preact", "layer2.4.preact", "layer3.4.preact"]
        else:
            assert model.student_layers == model.teacher_layers == ZOO_LAYERS[name]
    else:
        model = build(name, student="timm:resnet10t", teacher="timm:resnet18", num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
        if name == "AB":  # the input of each stage's last ReLU
            assert model.student_layers == [f"layer{i}.0.act2:input" for i in range(1, 5)]
            assert model.teacher_layers == [f"layer{i}.1.act2:input" for i in range(1, 5)]
        else:
            assert model.student_layers == model.teacher_layers == TIMM_LAYERS[name]
    before = snapshot(model.student)
    # one init step (where the method has an init phase), then one ordinary step
    trainer = make_trainer(max_steps=2, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, **data)
    logged = {"train/loss", "train/loss_ce"} | {f"train/loss_{n}" for n in MAIN_LOSSES[name]}
    if name in INIT_METHODS:
        logged |= {"train/init_loss"} | {f"train/init_loss_{n}" for n in INIT_LOSSES[name]}
        assert model.init_phase_done
    for key in logged:
        assert torch.isfinite(trainer.callback_metrics[key]), f"{key} missing or not finite"
    assert changed(model.student, before)
    assert tuple(model.hparams.input_shape) == ((1, 8, 8) if pair == "digits" else (3, 32, 32))


# ------------------------------------------------------------------------------------------- losses as specified
def test_vid_loss_is_the_functional_loss_on_the_hooked_features():
    torch.manual_seed(0)
    model = VID(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert (model.hparams.vid_weight, model.hparams.ce_weight) == (1.0, 1.0)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    losses = model.distillation_losses(batch, student_out, teacher_out)
    s = hooked_features(model.student, ZOO_LAYERS["VID"], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, ZOO_LAYERS["VID"], x)
    expected = sum(vid_loss(r(a), b, r.variance()) for r, a, b in zip(model.regressors, s, t))
    assert set(losses) == {"vid"}
    torch.testing.assert_close(losses["vid"], expected)
    for regressor in model.regressors:
        torch.testing.assert_close(regressor.variance(), torch.full_like(regressor.variance(), 5.0))
    losses["vid"].backward()
    assert all(p.grad is not None for p in model.regressors.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_vid_pools_the_larger_map_before_the_regressor():
    model = VID(student="resnet8x4", teacher="resnet32x4", num_classes=100, student_layers=["layer1"],
                teacher_layers=["layer2"], input_shape=(3, 32, 32))
    regressor, = model.regressors
    assert (regressor.regressor[0].in_channels, regressor.regressor[-1].out_channels) == (64, 128)
    x = torch.randn(2, 3, 32, 32)
    batch = Batch(x, torch.zeros(2, dtype=torch.long))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    s, t = student_out.features["layer1"], teacher_out.features["layer2"]
    pooled = F.adaptive_avg_pool2d(s, (16, 16))
    torch.testing.assert_close(model.distillation_losses(batch, student_out, teacher_out)["vid"],
                               vid_loss(regressor(pooled), t, regressor.variance()))


def test_ft_losses_are_the_functional_losses_on_the_hooked_features():
    torch.manual_seed(0)
    model = FT(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    hp = model.hparams
    assert (hp.ft_weight, hp.init_epochs, hp.init_lr, hp.rate, hp.p) == (200.0, 30, 0.01, 0.5, 1.0)
    assert model.paraphraser.encoder[-2].out_channels == 128 and model.translator.encoder[0].in_channels == 256
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    with torch.no_grad():
        t, = hooked_features(model.teacher, ["layer3"], x)
    init = model.init_losses(batch)
    torch.testing.assert_close(init["reconstruction"], F.mse_loss(model.paraphraser(t)[1], t))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    s, = hooked_features(model.student, ["layer3"], x)
    losses = model.distillation_losses(batch, student_out, teacher_out)
    expected = 200.0 * ft_loss(model.translator(s), model.paraphraser.encode(t), 1.0, 2.0)
    torch.testing.assert_close(losses["ft"], expected)
    assert set(losses) == {"ft"} and expected > 0
    losses["ft"].backward()
    assert all(p.grad is None for p in model.paraphraser.parameters()), "the teacher's factor carries no gradient"
    assert all(p.grad is not None for p in model.translator.parameters())


def test_ab_init_loss_is_the_stage_weighted_functional_loss():
    torch.manual_seed(0)
    model = AB(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert all(isinstance(c, nn.Identity) for c in model.connectors), "equal shapes need no connector"
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    model.train()
    loss = model.init_losses(batch)
    s = hooked_features(model.student, model.student_layers, x)
    with torch.no_grad():
        t = hooked_features(model.teacher, model.teacher_layers, x)
    expected = 3e-3 * (0.25 * ab_loss(s[0], t[0]) + 0.5 * ab_loss(s[1], t[1]) + ab_loss(s[2], t[2]))
    assert set(loss) == {"ab"}
    torch.testing.assert_close(loss["ab"], expected)
    # pre-activations: negative values survive, unlike the stage outputs after their ReLU
    assert all((f < 0).any() for f in s + t)
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert model.distillation_losses(batch, student_out, teacher_out) == {}, "after the init phase: CE alone"


def test_fsp_init_loss_is_the_functional_loss_over_consecutive_stages():
    torch.manual_seed(0)
    model = FSP(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32))
    assert all(isinstance(c, nn.Identity) for c in model.connectors), "equal channels need no connector"
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    model.train()
    loss = model.init_losses(batch)
    s = hooked_features(model.student, ZOO_LAYERS["FSP"], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, ZOO_LAYERS["FSP"], x)
    expected = sum(fsp_loss(fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])) for i in range(3))
    assert set(loss) == {"fsp"}
    torch.testing.assert_close(loss["fsp"], expected)
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert model.distillation_losses(batch, student_out, teacher_out) == {}, "after the init phase: CE alone"


def test_connectors_map_the_student_where_shapes_differ():
    model = build("FSP", student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    assert [(c.conv.in_channels, c.conv.out_channels) for c in model.connectors] == [(8, 16), (16, 32)]
    model = build("AB", student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    assert all(isinstance(c, ConvReg) and c.conv.kernel_size == (1, 1) and not c.relu for c in model.connectors)
    assert isinstance(boundary_connector((2, 4, 8, 8), (2, 4, 8, 8)), nn.Identity)
    assert isinstance(boundary_connector((2, 4, 16, 16), (2, 4, 8, 8)), ConvReg)
    assert isinstance(channel_connector(4, 4), nn.Identity) and isinstance(channel_connector(4, 8), ConvBN)


def test_adapters_shapes_and_initial_variance():
    regressor = VIDRegressor(6, 10, init_variance=5.0)
    assert regressor(torch.randn(2, 6, 3, 3)).shape == (2, 10, 3, 3)
    torch.testing.assert_close(regressor.variance(), torch.full((10,), 5.0))
    assert all(not conv.bias for conv in regressor.regressor if isinstance(conv, nn.Conv2d))
    factor, reconstruction = Paraphraser(8, rate=0.5)(torch.randn(2, 8, 4, 4))
    assert factor.shape == (2, 4, 4, 4) and reconstruction.shape == (2, 8, 4, 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in Paraphraser(8).modules())
    assert Translator(6, 4)(torch.randn(2, 6, 4, 4)).shape == (2, 4, 4, 4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in Translator(6, 4).modules())


# -------------------------------------------------------------------------------------- trainable parts, phases
@pytest.mark.parametrize("name", list(METHODS))
def test_trainable_parts_are_optimized_checkpointed_restored_and_not_exported(name, digits, tmp_path):
    model = build(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert all(getattr(model, part) is None for part in PARTS[name]), "without input_shape the parts wait for data"
    record = OptimizedParameters()
    trainer = make_trainer(max_steps=2, limit_train_batches=1, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, digits)
    parts = [getattr(model, part) for part in PARTS[name]]
    assert all(parameter_ids(part) for part in parts)
    optimized = record.params[0] | record.params[1]
    assert parameter_ids(*parts) <= optimized, "every trainable part is optimized in its phase"
    prefixes = {part: next(key for key, sub in model.named_modules() if sub is getattr(model, part))
                for part in PARTS[name]}  # where each part lives now
    state = {f"{prefixes[part]}.{k}": v for part in PARTS[name] for k, v in getattr(model, part).state_dict().items()}
    checkpoint, restored = assert_parts_checkpointed(trainer, model, state, tmp_path)
    if name in INIT_METHODS:
        assert checkpoint["init_phase_done"] and restored.init_phase_done
        frozen = restored.frozen_after_init()[0]
        assert not any(p.requires_grad for p in frozen.parameters())
        assert not restored.train().frozen_after_init()[0].training


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


@pytest.mark.parametrize("name", INIT_METHODS)
def test_the_init_phase_optimizes_only_its_parts_and_freezes_them_after(name, digits):
    torch.manual_seed(0)
    model = build(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    record, snapshots = OptimizedParameters(), EpochSnapshots()
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[record, snapshots])
    trainer.fit(model, digits)
    after_init, final = snapshots.states
    frozen = model.frozen_after_init()[0]
    where = {part: next(key for key, sub in model.named_modules() if sub is getattr(model, part)) + "."
             for part in PARTS[name]}  # where each part lives now
    frozen_prefix = where[PARTS[name][0]]
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


# ----------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error():
    common = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    for name in INIT_METHODS:
        with pytest.raises(ValueError, match=f"{name} needs an init phase of at least one epoch, got init_epochs=0"):
            build(name, init_epochs=0, **common)
    with pytest.raises(ValueError, match=r"VID regresses \(N, C, H, W\) feature maps, but layer 'pool' gives shape "
                                         r"\(2, 16\)"):
        VID(student_layers=["pool"], teacher_layers=["pool"], input_shape=(1, 8, 8), **common)
    with pytest.raises(ValueError, match=r"FSP relates \(N, C, H, W\) feature maps.*'pool'"):
        build("FSP", student_layers=["stages.0", "pool"], teacher_layers=["stages.0", "pool"], input_shape=(1, 8, 8),
              **common)
    with pytest.raises(ValueError, match="FSP relates consecutive layers, but got one pair"):
        build("FSP", student_layers=["stages.1"], teacher_layers=["stages.1"], **common)
    with pytest.raises(ValueError, match="AB pairs student and teacher layers in order.*1 student.*2 teacher"):
        build("AB", student_layers=["stages.1"], teacher_layers=["stages.0", "stages.1"], **common)
    with pytest.raises(ValueError, match="rate=0.01 leaves no factor channels.*32 channels: use a larger rate"):
        build("FT", rate=0.01, input_shape=(1, 8, 8), **common)
    with pytest.raises(ValueError, match=r"FT paraphrases \(N, C, H, W\) feature maps"):
        build("FT", student_layer="pool", teacher_layer="pool", input_shape=(1, 8, 8), **common)


def test_ab_takes_the_inputs_of_the_last_relus_of_models_without_pre_activation_features():
    """Small CNNs and timm models list no pre-activations: AB hooks the input of each stage's last ReLU, which
    holds the pre-activation values even where that ReLU is in-place."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = AB(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, init_epochs=1)
    assert model.student_layers == model.teacher_layers == ["stages.1.1.2:input"]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher = model.teacher
    with torch.no_grad():  # the stem, then the stage's pool, conv and BatchNorm: the values before the ReLU
        pre = teacher.stages[1][1][1](teacher.stages[1][1][0](teacher.stages[1][0](teacher.stages[0](x))))
    teacher_out = model.forward_teacher(Batch(x, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(teacher_out.features["stages.1.1.2:input"], pre)
    assert (pre < 0).any()


def test_init_phase_methods_share_the_mechanism():
    assert all(issubclass(METHODS[name], InitPhaseDistillation) for name in INIT_METHODS)
    assert not issubclass(VID, InitPhaseDistillation)
    defaults = {name: METHODS[name](student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1).hparams
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
