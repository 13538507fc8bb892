"""OFD and ReviewKD: train out of the box on three model families with shape-inferred connectors/fusion, take the
teacher's features before its ReLUs (also from timm models with in-place ReLUs), compute the functional losses on
the hooked features with the reference weighting, keep their trainable parts in the optimizer and the checkpoint but
out of the exported student, and name the fix for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_parts_checkpointed, hooked_features, make_trainer, random_loader
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin_from_bn
from lightning_kd.methods import Batch
from lightning_kd.methods.ofd import OFD
from lightning_kd.methods.reviewkd import ReviewKD
from lightning_kd.models import create_model
from lightning_kd.nn.projectors import ConvBN
from lightning_kd.nn.review import as_map

METHODS = {"OFD": OFD, "ReviewKD": ReviewKD}
LOSS_NAME = {"OFD": "ofd", "ReviewKD": "reviewkd"}
PAIRS = {"digits": ("cnn_tiny", "cnn_small", 10, 1), "resnet": ("resnet8x4", "resnet32x4", 100, 3),
         "timm": ("timm:resnet10t", "timm:resnet18", 10, 3)}
ZOO_PREACT = {"student": [f"layer{i}.0.preact" for i in (1, 2, 3)],
              "teacher": [f"layer{i}.4.preact" for i in (1, 2, 3)]}
TIMM_PREACT = {"student": [f"layer{i}.0.act2:input" for i in (1, 2, 3, 4)],
               "teacher": [f"layer{i}.1.act2:input" for i in (1, 2, 3, 4)]}
LAYERS = {
    ("OFD", "digits"): (["stages.1.1.2:input"], ["stages.1.1.2:input"]),
    ("OFD", "resnet"): (ZOO_PREACT["student"], ZOO_PREACT["teacher"]),
    ("OFD", "timm"): (TIMM_PREACT["student"], TIMM_PREACT["teacher"]),
    ("ReviewKD", "digits"): (["stages.1", "pool"], ["stages.1.1.2:input", "pool"]),
    ("ReviewKD", "resnet"): (["layer1", "layer2", "layer3", "avgpool"], ZOO_PREACT["teacher"] + ["avgpool"]),
    ("ReviewKD", "timm"): (["layer1", "layer2", "layer3", "layer4", "fc:input"], TIMM_PREACT["teacher"] + ["fc:input"]),
}



def build(name: str, pair: str, **kwargs):
    student, teacher, num_classes, in_chans = PAIRS[pair]
    return METHODS[name](student=student, teacher=teacher, num_classes=num_classes, in_chans=in_chans, **kwargs)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm affine parameters (γ of both signs, β around 0), so that margins differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
    return model


def test_defaults_are_the_reference_cifar100_settings():
    ofd = build("OFD", "digits")
    assert (ofd.hparams.ofd_weight, ofd.hparams.ce_weight) == (1e-3, 1.0)
    review = build("ReviewKD", "digits")
    hp = review.hparams
    assert (hp.reviewkd_weight, hp.ce_weight, hp.warmup_epochs, hp.max_mid_channels) == (1.0, 1.0, 20, 512)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", list(METHODS))
def test_trains_out_of_the_box(name, pair, digits):
    torch.manual_seed(0)
    model = build(name, pair)
    assert (model.student_layers, model.teacher_layers) == LAYERS[name, pair]
    data = {"datamodule": digits} if pair == "digits" else {"train_dataloaders": random_loader(PAIRS[pair][2])}
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in ("", "_ce", f"_{LOSS_NAME[name]}"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    assert trainer.callback_metrics[f"train/loss_{LOSS_NAME[name]}"] > 0
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    assert tuple(model.hparams.input_shape) == ((1, 8, 8) if pair == "digits" else (3, 32, 32))


@pytest.mark.parametrize("pair, stages", [("digits", {"stages.1.1.2:input": "stages.1"}),
                                          ("timm", {f"layer{i}.1.act2:input": f"layer{i}" for i in (1, 2, 3, 4)})])
def test_teacher_features_are_taken_before_the_relu(pair, stages):
    torch.manual_seed(0)
    model = build("OFD", pair)
    randomize_batchnorms(model.teacher)
    randomize_batchnorms(model.student, seed=1)  # timm zero-initialises the last BN of each block
    x = torch.randn(2, *((1, 8, 8) if pair == "digits" else (3, 32, 32)))
    features = model.forward_teacher(Batch(x, torch.zeros(2, dtype=torch.long))).features
    with torch.no_grad():
        outputs = hooked_features(model.teacher, list(stages.values()), x)
    for layer, output in zip(stages, outputs):
        assert (features[layer] < 0).any(), f"{layer} holds no negative value: it was captured after the ReLU"
        torch.testing.assert_close(F.relu(features[layer]), output)
    student_features = model.forward_student(Batch(x, torch.zeros(2, dtype=torch.long))).features
    assert all((feature < 0).any() and feature.requires_grad for feature in student_features.values())


@pytest.mark.parametrize("pair, bns", [("digits", ["stages.1.1.1"]),
                                       ("resnet", [f"layer{i}.4.bn2" for i in (1, 2, 3)]),
                                       ("timm", [f"layer{i}.1.bn2" for i in (1, 2, 3, 4)])])
def test_margins_come_from_the_batchnorm_before_each_teacher_relu(pair, bns):
    student, teacher, num_classes, in_chans = PAIRS[pair]
    teacher = randomize_batchnorms(create_model(teacher, num_classes=num_classes, in_chans=in_chans))
    shape = (1, 8, 8) if pair == "digits" else (3, 32, 32)
    model = OFD(student=student, teacher=teacher, num_classes=num_classes, in_chans=in_chans, input_shape=shape)
    assert model.teacher_bns == bns
    assert len(model.margins) == len(bns)
    for margin, bn in zip(model.margins, bns):
        expected = ofd_margin_from_bn(teacher.get_submodule(bn))
        assert torch.equal(margin, expected) and margin.std() > 0


def test_ofd_loss_is_the_weighted_sum_of_the_functional_losses():
    torch.manual_seed(0)
    teacher = randomize_batchnorms(create_model("resnet32x4", num_classes=100))
    model = OFD(student="resnet8x4", teacher=teacher, num_classes=100, input_shape=(3, 32, 32))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    losses = model.distillation_losses(batch, model.forward_student(batch), model.forward_teacher(batch))
    student_feats = hooked_features(model.student, ZOO_PREACT["student"], x)
    with torch.no_grad():
        teacher_feats = hooked_features(model.teacher, ZOO_PREACT["teacher"], x)
    terms = [ofd_loss(connector(s), t, margin)
             for connector, s, t, margin in zip(model.connectors, student_feats, teacher_feats, model.margins)]
    expected = 1e-3 * (terms[0] / 4 + terms[1] / 2 + terms[2])
    assert set(losses) == {"ofd"} and all(term > 0 for term in terms)
    torch.testing.assert_close(losses["ofd"], expected)
    losses["ofd"].backward()
    assert all(p.grad is not None for p in model.connectors.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_ofd_connectors_are_conv_bn_sized_from_the_dry_run():
    model = build("OFD", "digits", input_shape=(1, 8, 8))
    connector, = model.connectors
    assert isinstance(connector, ConvBN) and not connector.relu
    assert (connector.conv.in_channels, connector.conv.out_channels, connector.conv.kernel_size) == (16, 32, (1, 1))


def test_reviewkd_loss_is_the_ramped_sum_of_hcl_losses(monkeypatch):
    torch.manual_seed(0)
    model = build("ReviewKD", "resnet", input_shape=(3, 32, 32))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    batch = Batch(x, torch.randint(0, 100, (4,)))
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    student_feats = hooked_features(model.student, LAYERS["ReviewKD", "resnet"][0], x)
    with torch.no_grad():
        teacher_feats = hooked_features(model.teacher, LAYERS["ReviewKD", "resnet"][1], x)
    teacher_feats[-1] = teacher_feats[-1][:, :, None, None]
    full = sum(hcl_loss(f, t) for f, t in zip(model.fusion(student_feats), teacher_feats))
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        monkeypatch.setattr(ReviewKD, "current_epoch", property(lambda self, epoch=epoch: epoch))
        losses = model.distillation_losses(batch, student_out, teacher_out)
        assert set(losses) == {"reviewkd"}
        torch.testing.assert_close(losses["reviewkd"], ramp * full)
    assert full > 0
    losses["reviewkd"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters())


@pytest.mark.parametrize("pair, mid", [("resnet", 256), ("timm", 512)])
def test_fusion_maps_every_student_level_onto_its_teacher_feature(pair, mid):
    torch.manual_seed(0)
    model = build("ReviewKD", pair, input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    student_feats = list(model.forward_student(Batch(x, torch.zeros(2, dtype=torch.long))).features.values())
    teacher_feats = list(model.forward_teacher(Batch(x, torch.zeros(2, dtype=torch.long))).features.values())
    abfs = model.fusion.abfs
    assert [abf.reduce[0].in_channels for abf in abfs] == [f.shape[1] for f in student_feats]
    assert all(abf.reduce[0].out_channels == mid for abf in abfs)
    assert [abf.attention is not None for abf in abfs] == [True] * (len(abfs) - 1) + [False]
    fused = model.fusion(student_feats)
    assert [f.shape for f in fused] == [(t if t.dim() == 4 else t[:, :, None, None]).shape for t in teacher_feats]

    # the shallowest level by hand: reduce, fuse with the deeper levels' result resized to it, resize, output conv
    model.fusion.eval()
    residual = None
    for feat, abf, size in reversed(list(zip(student_feats, abfs, model.fusion.out_sizes))[1:]):
        _, residual = abf(as_map(feat), residual, size)
    first = abfs[0]
    reduced = first.reduce(student_feats[0])
    upsampled = F.interpolate(residual, size=reduced.shape[-2:], mode="nearest")
    weights = torch.sigmoid(first.attention[0](torch.cat([reduced, upsampled], 1)))
    mixed = reduced * weights[:, :1] + upsampled * weights[:, 1:]
    mixed = F.interpolate(mixed, size=model.fusion.out_sizes[0], mode="nearest")
    torch.testing.assert_close(model.fusion(student_feats)[0], first.output(mixed))


@pytest.mark.parametrize("name", list(METHODS))
def test_trainable_parts_are_optimized_checkpointed_restored_and_not_exported(name, digits, tmp_path):
    model = build(name, "digits")
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


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stage 'stages\.1' of the teacher \(ConvNeXt\) has no nn\.ReLU.*"
                                         r"pass teacher_layers=\[\.\.\.\].*teacher_bns="):
        OFD(student="timm:resnet10t", teacher="timm:test_convnext", num_classes=10)
    with pytest.raises(ValueError, match="teacher_bns must name BatchNorm modules.*'stages.1.1.0' .* Conv2d"):
        build("OFD", "digits", teacher_bns=["stages.1.1.0"])
    with pytest.raises(ValueError, match="one teacher BatchNorm per teacher layer.*2 teacher_bns for 1"):
        build("OFD", "digits", teacher_bns=["stages.1.1.1", "stages.0.0.1"])
    with pytest.raises(ValueError, match="BatchNorm 'stages.0.0.1' has 16 channels but teacher layer .* has 32.*"
                                         "teacher_bns"):
        build("OFD", "digits", teacher_bns=["stages.0.0.1"], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="found none for stages.1.0.*pass teacher_bns"):
        build("OFD", "digits", student_layers=["stages.1.1.2:input"], teacher_layers=["stages.1.0"])
    with pytest.raises(ValueError, match="OFD pairs student and teacher layers in order.*1 student.*2 teacher"):
        build("OFD", "digits", student_layers=["stages.1.1.2:input"],
              teacher_layers=["stages.0.0.2:input", "stages.1.1.2:input"])
    with pytest.raises(ValueError, match="ReviewKD pairs student and teacher layers in order: pass both"):
        build("ReviewKD", "digits", student_layers=["stages.1", "pool"])
    with pytest.raises(ValueError, match=r"the teacher \(SimpleCNN\) has no module 'stages.7'"):
        build("ReviewKD", "digits", student_layers=["stages.1", "pool"], teacher_layers=["stages.7", "pool"])
