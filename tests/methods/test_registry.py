"""Tests parametrized over the method registry or over several methods: every method trains and logs its losses,
trains with mixing, keeps its trainable parts (projectors, adapters, connectors) optimized, checkpointed, restored
and out of the exported student."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import assert_parts_checkpointed, hooked_features, make_trainer, random_loader, snapshot
from helpers import (ADAPTER_METHODS, ADAPTER_PARTS, ADAPTER_ZOO_LAYERS, FUSION_LAYERS, FUSION_METHODS, FUSION_PAIRS,
                     INIT_METHODS, ROOT, OptimizedParameters, StepRecorder, adapter_kd, digits_peers, fusion_kd,
                     logits_pair, method_losses, parameter_ids, peer_batch)
from lightning_kd.cli import main
from lightning_kd.losses import (at_loss, cc_loss, dist_loss, dkd_loss, fitnet_loss, kd_loss, logsum_distance, nst_loss,
                                 pkt_loss, rkd_loss, sp_loss, standardize_logits)
from lightning_kd.methods import (CTKD, DIST, DKD, KD, MLKD, RLD, SRD, Batch, FitNet, InitPhaseDistillation, NormKD,
                                  TfKDSelf, get_method, list_methods)
from lightning_kd.methods.dml import DML
from lightning_kd.methods.kdcl import KDCL
from lightning_kd.methods.ofd import OFD
from lightning_kd.methods.tfkd import TfKDVirtual
from lightning_kd.methods.vid import VID
from lightning_kd.models import create_model
from lightning_kd.nn.adapters import boundary_connector, channel_connector
from lightning_kd.nn.projectors import ConvBN, ConvReg
from lightning_kd.terms import ATTerm, KDTerm


LOGIT_LOSS_NAMES = {"Supervised": set(), "KD": {"kd"}, "DKD": {"dkd"}, "DIST": {"dist"}, "CTKD": {"kd"},
                    "NormKD": {"kd"}, "RLD": {"rld"}, "MLKD": {"mlkd"}, "TfKDSelf": {"kd"}, "TfKDVirtual": {"virtual"}}


# method, its teacher in the training test, the names of its losses
REFINED_LOGIT_METHODS = [(RLD, "cnn_small", "rld"), (MLKD, "cnn_small", "mlkd"), (TfKDSelf, "cnn_tiny", "kd"),
                         (TfKDVirtual, None, "virtual")]


FEATURE_LOSS_NAMES = {"FitNet": {"fitnet"}, "AT": {"at"}, "SP": {"sp"}, "PKT": {"pkt"}, "RKD": {"rkd"}, "NST": {"nst"},
                      "CC": {"cc"}, "ProjectorKD": {"logsum", "kd"}, "SRD": {"fm", "sr", "kd"}}


PROJECTED = ["FitNet", "ProjectorKD", "SRD"]


# the layers each method hooks on resnet8x4 ← resnet32x4 and on timm's resnet10t ← resnet18 (same names on both)
FEATURE_ZOO_LAYERS = {"FitNet": ["layer2"], "AT": ["layer1", "layer2", "layer3"], "NST": ["layer1", "layer2", "layer3"],
                      "SP": ["layer3"], "PKT": ["avgpool"], "RKD": ["avgpool"], "CC": ["avgpool"],
                      "ProjectorKD": ["avgpool"], "SRD": ["avgpool"]}


FEATURE_TIMM_LAYERS = {"FitNet": ["layer2"], "AT": ["layer1", "layer2", "layer3", "layer4"],
                       "NST": ["layer1", "layer2", "layer3", "layer4"], "SP": ["layer4"], "PKT": ["fc:input"],
                       "RKD": ["fc:input"], "CC": ["fc:input"], "ProjectorKD": ["fc:input"], "SRD": ["fc:input"]}


def expected_loss(name, model, s, t, s_logits, t_logits):
    """The method's weighted losses from the functional losses, on manually hooked features."""
    if name == "FitNet":
        return {"fitnet": 100.0 * fitnet_loss(model.projector(s[0]), t[0])}
    if name == "AT":
        return {"at": 1000.0 * sum(at_loss(a, b, 2.0) for a, b in zip(s, t))}
    if name == "NST":
        return {"nst": 50.0 * sum(nst_loss(a, b) for a, b in zip(s, t))}
    if name == "SP":
        return {"sp": 3000.0 * sp_loss(s[0], t[0])}
    if name == "PKT":
        return {"pkt": 30000.0 * pkt_loss(s[0], t[0])}
    if name == "RKD":
        return {"rkd": 1.0 * rkd_loss(s[0], t[0], 25.0, 50.0)}
    if name == "CC":
        return {"cc": 100.0 * cc_loss(s[0], t[0], 0.4, 2)}
    if name == "ProjectorKD":
        normalized_s = F.batch_norm(model.projector(s[0]), None, None, training=True, eps=1e-4)
        normalized_t = F.batch_norm(t[0], None, None, training=True, eps=1e-4)
        return {"logsum": 2.0 * logsum_distance(normalized_s, normalized_t, 4.0),
                "kd": 1.0 * kd_loss(s_logits, t_logits, 1.0)}
    connected = model.projector(s[0])
    return {"fm": 1.0 * fitnet_loss(connected, t[0]),
            "sr": 1.0 * F.mse_loss(model.teacher.fc(connected), t_logits),
            "kd": 1.0 * kd_loss(s_logits, t_logits, 4.0)}


#: the losses logged in the init phase and after it
INIT_LOSSES = {"FSP": {"fsp"}, "AB": {"ab"}, "FT": {"reconstruction"}}


MAIN_LOSSES = {"VID": {"vid"}, "FSP": set(), "AB": set(), "FT": {"ft"}}


ADAPTER_TIMM_LAYERS = {"VID": ["layer1", "layer2", "layer3", "layer4"],
                       "FSP": ["act1", "layer1", "layer2", "layer3", "layer4"],
                       "FT": ["layer4"]}


def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


FUSION_LOSS_NAME = {"OFD": "ofd", "ReviewKD": "reviewkd"}


ONLINE_METHODS = {"DML": (DML, "kl"), "KDCL": (KDCL, "kd")}


def peer_of(loss_name: str) -> int:
    return 0 if loss_name == "ce" else int(loss_name.rsplit("peer", 1)[1])


def manual_accuracy(model, images, targets):
    with torch.no_grad():
        logits = [peer.eval()(images) for peer in model.peer_models()]
    per_peer = [(z.argmax(1) == targets).float().mean().item() for z in logits]
    ensemble = torch.stack([z.softmax(1) for z in logits]).mean(0)
    return per_peer, (ensemble.argmax(1) == targets).float().mean().item()


ONLINE_CONFIGS = {"cifar100/dml/resnet32_resnet32.yaml": ("DML", "resnet32", ["resnet32"]),
                  "cifar100/kdcl/resnet32_resnet32.yaml": ("KDCL", "resnet32", ["resnet32"]),
                  "digits/dml.yaml": ("DML", "cnn_tiny", ["cnn_small"])}


ONLINE_DDP_SCRIPT = textwrap.dedent("""
           import sys

           import lightning as L
           import torch
           from lightning.pytorch.loggers import CSVLogger

           from lightning_kd.data import DigitsDataModule
           from lightning_kd.methods.dml import DML
           from lightning_kd.methods.kdcl import KDCL

           out = sys.argv[1]
           for method in (DML, KDCL):  # both fits run in the same two processes
               torch.manual_seed(0)
               model = method(student="cnn_tiny", peers=["cnn_tiny", "cnn_small"], num_classes=10, in_chans=1)
               trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4,
                                   logger=CSVLogger(out, name=method.__name__), log_every_n_steps=1,
                                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
               trainer.fit(model, DigitsDataModule(batch_size=64))
               torch.save(model.state_dict(), f"{out}/{method.__name__}_rank{trainer.global_rank}.pt")
""")


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


MIXING_EXPECTED = {
           "KD": lambda s, t, y: {"kd": 0.9 * kd_loss(s, t, 4.0)},
           "DIST": lambda s, t, y: {"dist": dist_loss(s, t, 2.0, 2.0, 4.0)},
           # epoch 0 of a 20-epoch warm-up; the labels are those of the image with the larger share
           "DKD": lambda s, t, y: {"dkd": dkd_loss(s, t, y, 1.0, 8.0, 4.0) / 20},
}


MIXING_METHODS = {"KD": KD, "DIST": DIST, "DKD": DKD}


# mixing is the base's: every method mixes, except those whose batches are not labelled images (DataFreeKD's are
# generated, LanguageModelKD's are tokens) and MLKD, whose strong view is not mixed with the weak one (it refuses)
MIXED_METHODS = [name for name in list_methods() if name not in ("DataFreeKD", "LanguageModelKD", "MLKD")]


def test_registry_lists_every_logit_method():
    assert set(LOGIT_LOSS_NAMES) <= set(list_methods())
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
    suffixes = {f"_{n}" for n in LOGIT_LOSS_NAMES.get(name, set())}
    for loss in {""} if prefix == "train/init_loss" else {"", "_ce"} | suffixes:
        assert torch.isfinite(logged[f"{prefix}{loss}"]), f"{prefix}{loss} missing or not finite"
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", [KD, DKD, DIST, CTKD, NormKD, RLD, MLKD, TfKDSelf])
def test_standardize_makes_the_loss_invariant_to_logit_scale(method):
    model = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True)
    student, teacher, target = logits_pair(1)
    plain = method_losses(model, student, teacher, target)
    scaled = method_losses(model, 5 * student + 2, 0.5 * teacher - 1, target)
    for name in plain:
        assert torch.allclose(plain[name], scaled[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,teacher,loss_name", REFINED_LOGIT_METHODS,
                         ids=[m.__name__ for m, _, _ in REFINED_LOGIT_METHODS])
def test_refined_logit_methods_train_and_log_their_losses(method, teacher, loss_name, digits):
    model = method(student="cnn_tiny", teacher=teacher, num_classes=10, in_chans=1)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, digits)
    logged = trainer.callback_metrics
    for loss in ("", "_ce", f"_{loss_name}"):
        assert torch.isfinite(logged[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert logged[f"train/loss_{loss_name}"] > 0
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", [RLD, MLKD, TfKDSelf])
def test_standardize_switch_applies_to_the_refined_logit_methods(method):
    model = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1, standardize=True)
    plain = method(student="mlp", teacher="mlp", num_classes=10, in_chans=1)
    student, teacher, target = logits_pair(2)
    got = method_losses(model, student, teacher, target)
    expected = method_losses(plain, standardize_logits(student), standardize_logits(teacher), target)
    scaled = method_losses(model, 5 * student + 2, 0.5 * teacher - 1, target)
    for name in got:
        assert torch.allclose(got[name], expected[name])
        assert torch.allclose(got[name], scaled[name], rtol=1e-4, atol=1e-6)


def test_registry_lists_every_feature_method():
    assert set(FEATURE_LOSS_NAMES) <= set(list_methods())


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(FEATURE_LOSS_NAMES))
def test_feature_methods_train_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    if pair == "digits":
        model = get_method(name)(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        data = {"datamodule": digits}
    elif pair == "resnet":
        model = get_method(name)(student="resnet8x4", teacher="resnet32x4", num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
        assert model.student_layers == model.teacher_layers == FEATURE_ZOO_LAYERS[name]
    else:
        model = get_method(name)(student="timm:resnet10t", teacher="timm:resnet18", num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
        assert model.student_layers == model.teacher_layers == FEATURE_TIMM_LAYERS[name]
    before = snapshot(model.student)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in {"", "_ce"} | {f"_{n}" for n in FEATURE_LOSS_NAMES[name]}:
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    if name in PROJECTED:
        assert tuple(model.hparams.input_shape) == ((1, 8, 8) if pair == "digits" else (3, 32, 32))


@pytest.mark.parametrize("name", list(FEATURE_LOSS_NAMES))
def test_loss_is_the_functional_loss_on_the_hooked_features(name):
    torch.manual_seed(0)
    shape = {"input_shape": (3, 32, 32)} if name in PROJECTED else {}
    model = get_method(name)(student="resnet8x4", teacher="resnet32x4", num_classes=100, **shape)
    assert model.hparams.ce_weight == 1.0
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert list(student_out.features) == FEATURE_ZOO_LAYERS[name]
    losses = model.distillation_losses(batch, student_out, teacher_out)
    s = hooked_features(model.student, FEATURE_ZOO_LAYERS[name], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, FEATURE_ZOO_LAYERS[name], x)
    expected = expected_loss(name, model, s, t, student_out.logits, teacher_out.logits)
    assert set(losses) == set(expected) == FEATURE_LOSS_NAMES[name]
    for key, value in expected.items():
        assert torch.allclose(losses[key], value, rtol=1e-4, atol=1e-6), key
        assert value.abs() > 0, f"{key} is zero: the comparison proves nothing"
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("name", PROJECTED)
def test_projector_is_optimized_checkpointed_restored_and_not_exported(name, digits, tmp_path):
    model = get_method(name)(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert model.projector is None, "without input_shape the projector waits for the data"
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, digits)
    projector_params = {id(p) for p in model.projector.parameters()}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert projector_params and projector_params <= optimized
    prefix = next(name for name, module in model.named_modules() if module is model.projector)
    projector_state = {f"{prefix}.{k}": v for k, v in model.projector.state_dict().items()}
    assert_parts_checkpointed(trainer, model, projector_state, tmp_path)


def test_a_wrong_layer_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the student \(SimpleCNN\) has no module 'stages\.5'\. Did you mean "
                                         r"'stages\.1'.*stage modules: stages\.0, stages\.1"):
        get_method("AT")(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1,
                         student_layers=["stages.5"], teacher_layers=["stages.1"])
    with pytest.raises(ValueError, match=r"the teacher \(CifarResNet\) has no module 'layer4'.*'layer1'"):
        FitNet(student="resnet8x4", teacher="resnet32x4", num_classes=100, teacher_layer="layer4")
    with pytest.raises(ValueError, match="the teacher .* has no module 'head'"):
        SRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, teacher_classifier="head")
    with pytest.raises(ValueError, match="AT pairs student and teacher layers in order.*1 student.*2 teacher"):
        get_method("AT")(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1,
                         teacher_layers=["stages.0", "stages.1"])


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(ADAPTER_METHODS))
def test_adapter_methods_train_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    if pair == "digits":
        model = adapter_kd(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        data = {"datamodule": digits}
    elif pair == "resnet":
        model = adapter_kd(name, student="resnet8x4", teacher="resnet32x4", num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
        if name == "AB":
            assert model.student_layers == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact"]
            assert model.teacher_layers == ["layer1.4.preact", "layer2.4.preact", "layer3.4.preact"]
        else:
            assert model.student_layers == model.teacher_layers == ADAPTER_ZOO_LAYERS[name]
    else:
        model = adapter_kd(name, student="timm:resnet10t", teacher="timm:resnet18", num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
        if name == "AB":  # the input of each stage's last ReLU
            assert model.student_layers == [f"layer{i}.0.act2:input" for i in range(1, 5)]
            assert model.teacher_layers == [f"layer{i}.1.act2:input" for i in range(1, 5)]
        else:
            assert model.student_layers == model.teacher_layers == ADAPTER_TIMM_LAYERS[name]
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


def test_connectors_map_the_student_where_shapes_differ():
    model = adapter_kd("FSP", student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1,
                       input_shape=(1, 8, 8))
    assert [(c.conv.in_channels, c.conv.out_channels) for c in model.connectors] == [(8, 16), (16, 32)]
    model = adapter_kd("AB", student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    assert all(isinstance(c, ConvReg) and c.conv.kernel_size == (1, 1) and not c.relu for c in model.connectors)
    assert isinstance(boundary_connector((2, 4, 8, 8), (2, 4, 8, 8)), nn.Identity)
    assert isinstance(boundary_connector((2, 4, 16, 16), (2, 4, 8, 8)), ConvReg)
    assert isinstance(channel_connector(4, 4), nn.Identity) and isinstance(channel_connector(4, 8), ConvBN)


@pytest.mark.parametrize("name", list(ADAPTER_METHODS))
def test_adapters_are_optimized_checkpointed_restored_and_not_exported(name, digits, tmp_path):
    model = adapter_kd(name, student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    assert all(getattr(model, part) is None for part in ADAPTER_PARTS[name]), \
        "without input_shape the parts wait for data"
    record = OptimizedParameters()
    trainer = make_trainer(max_steps=2, limit_train_batches=1, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, digits)
    parts = [getattr(model, part) for part in ADAPTER_PARTS[name]]
    assert all(parameter_ids(part) for part in parts)
    optimized = record.params[0] | record.params[1]
    assert parameter_ids(*parts) <= optimized, "every trainable part is optimized in its phase"
    prefixes = {part: next(key for key, sub in model.named_modules() if sub is getattr(model, part))
                for part in ADAPTER_PARTS[name]}  # where each part lives now
    state = {f"{prefixes[part]}.{k}": v for part in ADAPTER_PARTS[name]
             for k, v in getattr(model, part).state_dict().items()}
    checkpoint, restored = assert_parts_checkpointed(trainer, model, state, tmp_path)
    if name in INIT_METHODS:
        assert checkpoint["init_phase_done"] and restored.init_phase_done
        frozen = restored.frozen_after_init()[0]
        assert not any(p.requires_grad for p in frozen.parameters())
        assert not restored.train().frozen_after_init()[0].training


def test_bad_adapter_method_input_is_a_clear_error():
    common = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    for name in INIT_METHODS:
        with pytest.raises(ValueError, match=f"{name} needs an init phase of at least one epoch, got init_epochs=0"):
            adapter_kd(name, init_epochs=0, **common)
    with pytest.raises(ValueError, match=r"VID regresses \(N, C, H, W\) feature maps, but layer 'pool' gives shape "
                                         r"\(2, 16\)"):
        VID(student_layers=["pool"], teacher_layers=["pool"], input_shape=(1, 8, 8), **common)
    with pytest.raises(ValueError, match=r"FSP relates \(N, C, H, W\) feature maps.*'pool'"):
        adapter_kd("FSP", student_layers=["stages.0", "pool"], teacher_layers=["stages.0", "pool"],
                   input_shape=(1, 8, 8), **common)
    with pytest.raises(ValueError, match="FSP relates consecutive layers, but got one pair"):
        adapter_kd("FSP", student_layers=["stages.1"], teacher_layers=["stages.1"], **common)
    with pytest.raises(ValueError, match="AB pairs student and teacher layers in order.*1 student.*2 teacher"):
        adapter_kd("AB", student_layers=["stages.1"], teacher_layers=["stages.0", "stages.1"], **common)
    with pytest.raises(ValueError, match="rate=0.01 leaves no factor channels.*32 channels: use a larger rate"):
        adapter_kd("FT", rate=0.01, input_shape=(1, 8, 8), **common)
    with pytest.raises(ValueError, match=r"FT paraphrases \(N, C, H, W\) feature maps"):
        adapter_kd("FT", student_layer="pool", teacher_layer="pool", input_shape=(1, 8, 8), **common)


def test_ofd_and_reviewkd_defaults_are_the_reference_cifar100_settings():
    ofd = fusion_kd("OFD", "digits")
    assert (ofd.hparams.ofd_weight, ofd.hparams.ce_weight) == (1e-3, 1.0)
    review = fusion_kd("ReviewKD", "digits")
    hp = review.hparams
    assert (hp.reviewkd_weight, hp.ce_weight, hp.warmup_epochs, hp.max_mid_channels) == (1.0, 1.0, 20, 512)


@pytest.mark.parametrize("pair", list(FUSION_PAIRS))
@pytest.mark.parametrize("name", list(FUSION_METHODS))
def test_fusion_methods_train_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    model = fusion_kd(name, pair)
    assert (model.student_layers, model.teacher_layers) == FUSION_LAYERS[name, pair]
    data = {"datamodule": digits} if pair == "digits" else {"train_dataloaders": random_loader(FUSION_PAIRS[pair][2])}
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in ("", "_ce", f"_{FUSION_LOSS_NAME[name]}"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert trainer.callback_metrics[f"train/loss_{FUSION_LOSS_NAME[name]}"] > 0
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    assert tuple(model.hparams.input_shape) == ((1, 8, 8) if pair == "digits" else (3, 32, 32))


@pytest.mark.parametrize("name", list(FUSION_METHODS))
def test_fusion_parts_are_optimized_checkpointed_restored_and_not_exported(name, digits, tmp_path):
    model = fusion_kd(name, "digits")
    part = "connectors" if name == "OFD" else "fusion"
    assert getattr(model, part) is None, "without input_shape the trainable parts wait for the data"
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, digits)
    module = getattr(model, part)
    params = {id(p) for p in module.parameters()}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert params and params <= optimized
    prefix = next(key for key, sub in model.named_modules() if sub is module)  # where the part lives now
    state = {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    if name == "OFD":
        state[".".join(filter(None, [prefix.rpartition(".")[0], "margin_0"]))] = model.margins[0]
    assert_parts_checkpointed(trainer, model, state, tmp_path)


def test_bad_fusion_method_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stage 'stages\.1' of the teacher \(ConvNeXt\) has no nn\.ReLU.*"
                                         r"pass teacher_layers=\[\.\.\.\].*teacher_bns="):
        OFD(student="timm:resnet10t", teacher="timm:test_convnext", num_classes=10)
    with pytest.raises(ValueError, match="teacher_bns must name BatchNorm modules.*'stages.1.1.0' .* Conv2d"):
        fusion_kd("OFD", "digits", teacher_bns=["stages.1.1.0"])
    with pytest.raises(ValueError, match="one teacher BatchNorm per teacher layer.*2 teacher_bns for 1"):
        fusion_kd("OFD", "digits", teacher_bns=["stages.1.1.1", "stages.0.0.1"])
    with pytest.raises(ValueError, match="BatchNorm 'stages.0.0.1' has 16 channels but teacher layer .* has 32.*"
                                         "teacher_bns"):
        fusion_kd("OFD", "digits", teacher_bns=["stages.0.0.1"], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="found none for stages.1.0.*pass teacher_bns"):
        fusion_kd("OFD", "digits", student_layers=["stages.1.1.2:input"], teacher_layers=["stages.1.0"])
    with pytest.raises(ValueError, match="OFD pairs student and teacher layers in order.*1 student.*2 teacher"):
        fusion_kd("OFD", "digits", student_layers=["stages.1.1.2:input"],
              teacher_layers=["stages.0.0.2:input", "stages.1.1.2:input"])
    with pytest.raises(ValueError, match="ReviewKD pairs student and teacher layers in order: pass both"):
        fusion_kd("ReviewKD", "digits", student_layers=["stages.1", "pool"])
    with pytest.raises(ValueError, match=r"the teacher \(SimpleCNN\) has no module 'stages.7'"):
        fusion_kd("ReviewKD", "digits", student_layers=["stages.1", "pool"], teacher_layers=["stages.7", "pool"])


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(ONLINE_METHODS))
def test_online_methods_train_out_of_the_box(name, pair, digits):
    method, term = ONLINE_METHODS[name]
    torch.manual_seed(0)
    if pair == "digits":
        model, data = digits_peers(method), {"datamodule": digits}
    elif pair == "resnet":
        model = method(student="resnet8x4", peers=["resnet32x4"], num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
    else:
        model = method(student="timm:resnet10t", peers=["timm:resnet18"], num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
    before = [snapshot(peer) for peer in model.peer_models()]
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in ("", "_ce", "_ce_peer1", f"_{term}_peer0", f"_{term}_peer1"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    for index, (peer, state) in enumerate(zip(model.peer_models(), before)):
        assert any(not torch.equal(v, peer.state_dict()[k]) for k, v in state.items()), f"peer {index} not trained"


@pytest.mark.parametrize("name", list(ONLINE_METHODS))
def test_each_peer_gets_gradients_only_from_its_own_terms(name):
    torch.manual_seed(0)
    model = digits_peers(ONLINE_METHODS[name][0], peers=("cnn_small", "cnn_tiny"))
    batch = peer_batch(model)
    out = model.forward_student(batch)
    losses = {"ce": model.cross_entropy(out.logits, batch.target), **model.distillation_losses(batch, out, None)}
    assert len(losses) == 6
    for loss_name, value in losses.items():
        for index, peer in enumerate(model.peer_models()):
            grads = torch.autograd.grad(value, list(peer.parameters()), retain_graph=True, allow_unused=True)
            norm = sum(g.abs().sum() for g in grads if g is not None)
            if index == peer_of(loss_name):
                assert norm > 0, f"{loss_name} gives peer {index} no gradient"
            else:
                assert norm == 0, f"{loss_name} leaks a gradient into peer {index}"


@pytest.mark.parametrize("name", list(ONLINE_METHODS))
def test_per_peer_metrics_are_logged_and_the_best_peer_is_exported(name, digits, tmp_path):
    torch.manual_seed(0)
    model = digits_peers(ONLINE_METHODS[name][0], peers=("cnn_small", "cnn_tiny"))
    assert model.best_peer() == 0 and torch.isnan(model.peer_val_acc).all()
    trainer = make_trainer(max_epochs=1, limit_train_batches=6)
    trainer.fit(model, digits)
    images, targets = digits.datasets["val"].tensors
    per_peer, ensemble = manual_accuracy(model, images, targets)
    logged = trainer.callback_metrics
    for index, accuracy in enumerate(per_peer):
        assert logged[f"val/acc_peer{index}"].item() == pytest.approx(accuracy, abs=1e-6)
        assert model.peer_val_acc[index].item() == pytest.approx(accuracy, abs=1e-6)
    assert logged["val/acc_ensemble"].item() == pytest.approx(ensemble, abs=1e-6)
    assert logged["val/acc"].item() == pytest.approx(per_peer[0], abs=1e-6)
    assert len(set(per_peer)) > 1, "the peers should differ after training"
    assert model.best_peer() == max(range(3), key=lambda i: (per_peer[i], -i))

    model.peer_val_acc.copy_(torch.tensor([0.2, 0.5, 0.9]))
    model.export_student(tmp_path / "best.pt")
    model.export_peer(1, tmp_path / "peer1.pt")
    for path, index, architecture in (("best.pt", 2, "cnn_tiny"), ("peer1.pt", 1, "cnn_small")):
        deployed = create_model(architecture, num_classes=10, in_chans=1)
        deployed.load_state_dict(torch.load(tmp_path / path, weights_only=True))
        assert torch.equal(deployed.eval()(images), model.peer(index).eval()(images)), path
    test_metrics = trainer.test(model, digits, verbose=False)[0]
    assert {f"test/acc_peer{i}" for i in range(3)} | {"test/acc_ensemble"} <= set(test_metrics)
    with pytest.raises(IndexError, match="peers are 0 to 2"):
        model.peer(3)


@pytest.mark.parametrize("name", list(ONLINE_METHODS))
def test_online_methods_checkpoint_round_trip(name, digits, tmp_path):
    method = ONLINE_METHODS[name][0]
    torch.manual_seed(0)
    model = digits_peers(method)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "online.ckpt")
    checkpoint = torch.load(tmp_path / "online.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["peers"] == ["cnn_small"]
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} >= {"student", "peers", "peer_val_acc"}
    restored = method.load_from_checkpoint(tmp_path / "online.ckpt")
    assert torch.isfinite(model.peer_val_acc).all()
    assert torch.equal(restored.peer_val_acc, model.peer_val_acc) and restored.best_peer() == model.best_peer()
    for original, loaded in zip(model.peer_models(), restored.peer_models()):
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    # peers given as modules are not hyper-parameters: they are passed again, their weights come from the checkpoint
    torch.manual_seed(1)
    student, peer = create_model("cnn_tiny", num_classes=10, in_chans=1), create_model("cnn_small", num_classes=10,
                                                                                         in_chans=1)
    model = method(student=student, peers=[peer], num_classes=10)
    assert "peers" not in model.hparams
    make_trainer(max_steps=2, limit_val_batches=1).fit(model, digits)
    model.trainer.save_checkpoint(tmp_path / "modules.ckpt")
    assert "peers" not in torch.load(tmp_path / "modules.ckpt", weights_only=True)["hyper_parameters"]
    restored = method.load_from_checkpoint(tmp_path / "modules.ckpt",
                                           student=create_model("cnn_tiny", num_classes=10, in_chans=1),
                                           peers=[create_model("cnn_small", num_classes=10, in_chans=1)])
    for key, value in peer.state_dict().items():
        assert torch.equal(restored.peer(1).state_dict()[key], value), key


@pytest.mark.parametrize("name", list(ONLINE_METHODS))
def test_peers_with_another_class_count_are_a_clear_error(name, digits):
    model = ONLINE_METHODS[name][0](student="cnn_tiny", peers=[create_model("cnn_tiny", num_classes=5, in_chans=1)],
                             num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"peer 1 of .* shape \(64, 5\) but num_classes is 10: .*num_classes=10"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, digits)


@pytest.mark.parametrize("config", list(ONLINE_CONFIGS))
def test_online_configs_resolve_and_keep_model_names(config, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/experiments" / config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    name, student, peers = ONLINE_CONFIGS[config]
    init_args = resolved["model"]["init_args"]
    assert resolved["model"]["class_path"].endswith(f".{name}") and init_args["teacher"] is None
    assert (init_args["student"], init_args["peers"]) == (student, peers)


@pytest.mark.ddp
def test_online_methods_train_log_and_checkpoint_in_two_process_ddp_on_cpu(tmp_path):
    script = tmp_path / "online_ddp.py"
    script.write_text(ONLINE_DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (method, term) in ONLINE_METHODS.items():
        ranks = [torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True) for rank in range(2)]
        assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("peers.1.") for k in ranks[0])
        for key, value in ranks[0].items():
            assert torch.equal(value, ranks[1][key]), f"{name}: {key} differs between the processes"
        rows = list(csv.DictReader((tmp_path / name / "version_0" / "metrics.csv").open()))
        val = [r for r in rows if r.get("val/acc_ensemble")]
        train = [r for r in rows if r.get(f"train/loss_{term}_peer2")]
        assert len(val) == 1 and len(train) == 4, name
        # the stored accuracies are those of the whole validation set, gathered from both processes
        logged = [float(val[0][f"val/acc_peer{i}"]) for i in range(3)]
        assert ranks[0]["peer_val_acc"].tolist() == pytest.approx(logged, abs=1e-6)
        restored = method.load_from_checkpoint(next((tmp_path / name).rglob("*.ckpt")))
        assert restored.num_peers == 3 and restored.best_peer() == max(range(3), key=lambda i: (logged[i], -i))
        for key, value in restored.state_dict().items():
            assert torch.equal(value, ranks[0][key]), f"{name}: {key} differs in the checkpoint"


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("name", list(MIXING_EXPECTED))
def test_teacher_and_student_see_one_mixed_batch_and_losses_are_the_functional_ones(name, mode, digits):
    torch.manual_seed(0)
    model = MIXING_METHODS[name](student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, mix=mode)
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
    for key, value in MIXING_EXPECTED[name](s, t, y).items():
        assert logged[f"train/loss_{key}"].item() == pytest.approx(value.item(), rel=1e-5), key


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
