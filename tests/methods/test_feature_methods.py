"""Feature methods: train out of the box on three model families, losses equal the functional losses on hooked
features, projectors are built from inferred shapes, optimized, checkpointed, restored and never exported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import assert_parts_checkpointed, hooked_features, make_trainer, random_loader, snapshot
from lightning_kd.losses import (
    at_loss,
    cc_loss,
    fitnet_loss,
    kd_loss,
    logsum_distance,
    nst_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
)
from lightning_kd.methods import KD, SRD, Batch, FitNet, ProjectorKD, get_method, list_methods
from lightning_kd.nn import PROJECTORS, ConvReg, ProjectorEnsemble, build_projector

LOSS_NAMES = {"FitNet": {"fitnet"}, "AT": {"at"}, "SP": {"sp"}, "PKT": {"pkt"}, "RKD": {"rkd"}, "NST": {"nst"},
              "CC": {"cc"}, "ProjectorKD": {"logsum", "kd"}, "SRD": {"fm", "sr", "kd"}}
PROJECTED = ["FitNet", "ProjectorKD", "SRD"]

# the layers each method hooks on resnet8x4 ← resnet32x4 and on timm's resnet10t ← resnet18 (same names on both)
ZOO_LAYERS = {"FitNet": ["layer2"], "AT": ["layer1", "layer2", "layer3"], "NST": ["layer1", "layer2", "layer3"],
              "SP": ["layer3"], "PKT": ["avgpool"], "RKD": ["avgpool"], "CC": ["avgpool"], "ProjectorKD": ["avgpool"],
              "SRD": ["avgpool"]}
TIMM_LAYERS = {"FitNet": ["layer2"], "AT": ["layer1", "layer2", "layer3", "layer4"],
               "NST": ["layer1", "layer2", "layer3", "layer4"], "SP": ["layer4"], "PKT": ["fc:input"],
               "RKD": ["fc:input"], "CC": ["fc:input"], "ProjectorKD": ["fc:input"], "SRD": ["fc:input"]}




def test_registry_lists_every_feature_method():
    assert set(LOSS_NAMES) <= set(list_methods())


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(LOSS_NAMES))
def test_trains_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    if pair == "digits":
        model = get_method(name)(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
        data = {"datamodule": digits}
    elif pair == "resnet":
        model = get_method(name)(student="resnet8x4", teacher="resnet32x4", num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
        assert model.student_layers == model.teacher_layers == ZOO_LAYERS[name]
    else:
        model = get_method(name)(student="timm:resnet10t", teacher="timm:resnet18", num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
        assert model.student_layers == model.teacher_layers == TIMM_LAYERS[name]
    before = snapshot(model.student)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in {"", "_ce"} | {f"_{n}" for n in LOSS_NAMES[name]}:
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    if name in PROJECTED:
        assert tuple(model.hparams.input_shape) == ((1, 8, 8) if pair == "digits" else (3, 32, 32))


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


@pytest.mark.parametrize("name", list(LOSS_NAMES))
def test_loss_is_the_functional_loss_on_the_hooked_features(name):
    torch.manual_seed(0)
    shape = {"input_shape": (3, 32, 32)} if name in PROJECTED else {}
    model = get_method(name)(student="resnet8x4", teacher="resnet32x4", num_classes=100, **shape)
    assert model.hparams.ce_weight == 1.0
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    assert list(student_out.features) == ZOO_LAYERS[name]
    losses = model.distillation_losses(batch, student_out, teacher_out)
    s = hooked_features(model.student, ZOO_LAYERS[name], x)
    with torch.no_grad():
        t = hooked_features(model.teacher, ZOO_LAYERS[name], x)
    expected = expected_loss(name, model, s, t, student_out.logits, teacher_out.logits)
    assert set(losses) == set(expected) == LOSS_NAMES[name]
    for key, value in expected.items():
        assert torch.allclose(losses[key], value, rtol=1e-4, atol=1e-6), key
        assert value.abs() > 0, f"{key} is zero: the comparison proves nothing"
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


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


def test_projector_is_built_at_init_from_an_input_shape():
    model = SRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8))
    assert (model.projector.conv.in_channels, model.projector.conv.out_channels) == (16, 32)
    assert model.teacher_classifier_name == "fc"


def test_users_own_modules_with_explicit_names():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="no feature interface.*pass the module names explicitly"):
        ProjectorKD(student=student, teacher=teacher, num_classes=4)
    model = ProjectorKD(student=student, teacher=teacher, num_classes=4, student_layer="2:input",
                        teacher_layer="1")
    x = torch.randn(32, 20)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=16))
    assert tuple(model.hparams.input_shape) == (20,)
    assert (model.projector.linear.in_features, model.projector.linear.out_features) == (16, 64)
    assert torch.isfinite(trainer.callback_metrics["train/loss_logsum"])


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


@pytest.mark.parametrize("projector", PROJECTORS)
def test_fitnet_takes_every_projector(projector):
    torch.manual_seed(0)
    model = FitNet(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, projector=projector,
                   input_shape=(1, 8, 8))
    batch = Batch(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    loss = model.distillation_losses(batch, student_out, teacher_out)["fitnet"]
    expected = 100.0 * fitnet_loss(model.projector(student_out.features["stages.1"]), teacher_out.features["stages.1"])
    assert torch.allclose(loss, expected)


# ----------------------------------------------------------------------------------------------- projectors
@pytest.mark.parametrize("student_size, teacher_size, conv", [(16, 8, nn.Conv2d), (4, 8, nn.ConvTranspose2d),
                                                               (8, 8, nn.Conv2d), (10, 8, nn.Conv2d)])
def test_conv_reg_maps_the_student_map_onto_the_teachers(student_size, teacher_size, conv):
    regressor = ConvReg((2, 6, student_size, student_size), (2, 10, teacher_size, teacher_size))
    assert type(regressor.conv) is conv
    out = regressor(torch.randn(2, 6, student_size, student_size))
    assert out.shape == (2, 10, teacher_size, teacher_size) and (out >= 0).all()
    if student_size == teacher_size:
        assert regressor.conv.kernel_size == (1, 1)


def test_projectors_from_shapes_and_their_errors():
    for kind in PROJECTORS:
        assert build_projector(kind, (2, 6, 4, 4), (2, 10, 4, 4))(torch.randn(2, 6, 4, 4)).shape == (2, 10, 4, 4)
        if kind != "conv_reg":
            assert build_projector(kind, (2, 6), (2, 10))(torch.randn(3, 6)).shape == (3, 10)
    with pytest.raises(ValueError, match="'linear' projector keeps the spatial size.*conv_reg"):
        build_projector("linear", (2, 6, 8, 8), (2, 10, 4, 4))
    with pytest.raises(ValueError, match="ConvReg cannot map a 3×3 student map to a 8×8"):
        build_projector("conv_reg", (2, 6, 3, 3), (2, 10, 8, 8))
    with pytest.raises(ValueError, match="unknown projector 'mpl'"):
        build_projector("mpl", (2, 6), (2, 10))


def test_projector_ensemble_averages_rectified_linear_projections():
    ensemble = ProjectorEnsemble(6, 10, num_projectors=3)
    x = torch.randn(5, 6)
    manual = sum(torch.relu(x @ p.linear.weight.T + p.linear.bias) for p in ensemble.projectors) / 3
    assert torch.allclose(ensemble(x), manual, atol=1e-6)
    maps = torch.randn(2, 6, 3, 3)
    per_position = ensemble(maps.permute(0, 2, 3, 1).reshape(-1, 6)).reshape(2, 3, 3, 10).permute(0, 3, 1, 2)
    assert torch.allclose(ensemble(maps), per_position, atol=1e-6)
