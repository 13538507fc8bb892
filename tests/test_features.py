"""Capturing intermediate outputs by module name: defaults per model family, hook hygiene, errors, dry runs."""

import pytest
import torch
from torch import nn

from lightning_kd.features import (
    capture_features,
    check_layers,
    classifier_name,
    embedding_name,
    feature_shapes,
    stage_names,
)
from lightning_kd.models import create_model


def hooked(model, names, x):
    """Reference: outputs of ``names`` recorded with plain forward hooks."""
    modules = dict(model.named_modules())
    outputs = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n in names]
    logits = model(x)
    for handle in handles:
        handle.remove()
    return logits, outputs


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet8x4", num_classes=100).eval()


@pytest.fixture(scope="module")
def timm_resnet():
    torch.manual_seed(0)
    return create_model("timm:resnet10t", num_classes=10).eval()


def test_zoo_defaults_come_from_the_feature_interface(resnet):
    assert stage_names(resnet) == ["relu", "layer1", "layer2", "layer3"]
    assert stage_names(resnet, preact=True) == resnet.stage_names(preact=True)
    assert embedding_name(resnet) == "avgpool" and classifier_name(resnet) == "fc"


def test_captured_features_equal_plain_hooks_in_the_requested_order(resnet):
    x = torch.randn(2, 3, 32, 32)
    names = ["avgpool", "layer3", "layer1.0.preact", "relu"]
    with capture_features(resnet, names) as features:
        logits = resnet(x)
    reference_logits, reference = hooked(resnet, names, x)
    assert list(features) == names
    for name in names:
        assert torch.equal(features[name], reference[name]), name
    assert torch.equal(logits, reference_logits)
    assert features["avgpool"].shape == (2, 256) and features["layer3"].shape == (2, 256, 8, 8)
    assert hook_count(resnet) == 0


def test_timm_defaults_are_feature_info_and_the_classifier_input(timm_resnet):
    assert stage_names(timm_resnet) == [info["module"] for info in timm_resnet.feature_info]
    assert stage_names(timm_resnet)[1:] == ["layer1", "layer2", "layer3", "layer4"]
    assert classifier_name(timm_resnet) == "fc" and embedding_name(timm_resnet) == "fc:input"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with capture_features(timm_resnet, ["fc:input", "layer4"]) as features:
            timm_resnet(x)
        pre_logits = timm_resnet.forward_head(timm_resnet.forward_features(x), pre_logits=True)
    assert torch.equal(features["fc:input"], pre_logits)
    with pytest.raises(ValueError, match="no pre-activation"):
        stage_names(timm_resnet, preact=True)


def test_other_models_take_explicit_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for default in (stage_names, embedding_name):
        with pytest.raises(ValueError, match="no feature interface.*pass the module names explicitly.*0, 1, 2"):
            default(model)
    x = torch.randn(5, 4)
    with capture_features(model, ["1", "2:input"]) as features:
        model(x)
    assert torch.equal(features["1"], features["2:input"])
    assert torch.equal(features["1"], torch.relu(model[0](x)))


def test_a_wrong_name_lists_close_and_stage_names(resnet):
    with pytest.raises(ValueError, match=r"the student \(CifarResNet\) has no module 'layr2'\. Did you mean 'layer2'.*"
                                         r"stage modules: relu, layer1, layer2, layer3.*top-level modules: conv1"):
        check_layers(resnet, ["layer1", "layr2"], "student")
    with pytest.raises(ValueError, match="no module 'fcc'.*Did you mean 'fc'"):
        check_layers(resnet, "fcc:input")
    with pytest.raises(ValueError, match="no module 'nope'"):
        with capture_features(resnet, ["nope"]):
            pass
    assert check_layers(resnet, "layer2") == ["layer2"]
    assert hook_count(resnet) == 0


def test_hooks_are_removed_after_an_error_in_the_block(resnet):
    with pytest.raises(RuntimeError):
        with capture_features(resnet, ["layer1", "fc:input"]):
            assert hook_count(resnet) == 2
            resnet(torch.randn(2, 5, 32, 32))
    assert hook_count(resnet) == 0


def test_no_hooks_for_no_layers(resnet, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a hook was registered")

    monkeypatch.setattr(nn.Module, "register_forward_hook", forbidden)
    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", forbidden)
    with capture_features(resnet, []) as features:
        resnet(torch.randn(1, 3, 32, 32))
    assert features == {}


def test_a_module_that_runs_twice_or_never_is_an_error():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="module '1' of Sequential ran 2 times"):
        with capture_features(model, ["1"]):
            model(torch.randn(2, 4))
    unused = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    with pytest.raises(ValueError, match="module 'unused' of ModuleDict did not run"):
        with capture_features(unused, ["unused"]):
            unused["used"](torch.randn(2, 4))
    assert hook_count(model) == 0 and hook_count(unused) == 0


def test_features_carry_grad_exactly_when_the_forward_records_it(resnet):
    x = torch.randn(2, 3, 32, 32)
    with capture_features(resnet, ["layer2", "avgpool"]) as features:
        resnet(x)
    assert all(f.requires_grad for f in features.values())
    with torch.no_grad(), capture_features(resnet, ["layer2", "avgpool"]) as features:
        resnet(x)
    assert not any(f.requires_grad for f in features.values())


def test_feature_shapes_dry_run_leaves_modes_and_statistics_alone():
    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes=10, in_chans=1).train()
    model.stages[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feature_shapes(model, ["stages.0", "stages.1", "pool"], (1, 8, 8))
    assert shapes == {"stages.0": (2, 8, 8, 8), "stages.1": (2, 16, 4, 4), "pool": (2, 16)}
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_input_of_an_in_place_module_is_captured_before_it_is_overwritten():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with capture_features(model, ["1:input", "1"]) as features:
        model(x)
    pre = model[0](x)
    assert (pre < 0).any()
    torch.testing.assert_close(features["1:input"], pre)
    torch.testing.assert_close(features["1"], pre.relu())
