"""The CIFAR zoo against the published models of CRD/RepDistiller (identical in mdistiller).

``published/cifar_layouts.json`` holds, per model, the reference code's ordered ``(state-dict key, shape)`` list and
parameter count; ``published/cifar_logits.json`` the reference model's first logits with every state-dict entry set
by :func:`reference_fill` (the recipe is also written in that file). Both were generated once from the reference
repositories' own model code, built with ``num_classes=100``.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.methods.base import load_weights
from lightning_kd.models import create_model, list_models
from lightning_kd.models.cifar.resnet import resnet32x4

PUBLISHED = Path(__file__).parent / "published"
LAYOUTS = json.loads((PUBLISHED / "cifar_layouts.json").read_text())["models"]
LOGITS = json.loads((PUBLISHED / "cifar_logits.json").read_text())["logits"]
ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
       "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet18",
       "ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
TEACHERS = ["resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"]  # the public ckpt_epoch_240.pth


def reference_fill(layout: list) -> dict[str, torch.Tensor]:
    """The deterministic state dict the reference logits were computed with, in the published key order."""
    torch.manual_seed(0)
    state = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith("weight")):
            state[key] = torch.rand(shape) + 0.5
        elif len(shape) > 1:
            state[key] = torch.randn(shape) / torch.Size(shape[1:]).numel() ** 0.5
        else:
            state[key] = torch.randn(shape) * 0.1
    return state


def reference_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def assert_close_to_published(logits: torch.Tensor, name: str) -> None:
    expected = torch.tensor(LOGITS[name])
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits[:, :8], expected, rtol=0, atol=1e-4 * max(scale, 1.0))


def test_zoo_is_registered_and_published():
    assert sorted(LAYOUTS) == sorted(ZOO) == sorted(LOGITS)
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_and_shapes_are_the_published_ones(name):
    model = create_model(name, num_classes=100)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == LAYOUTS[name]["state_dict"]


@pytest.mark.parametrize("name", ZOO)
def test_published_weights_give_the_published_logits(name):
    model = create_model(name, num_classes=100)
    model.load_state_dict(reference_fill(LAYOUTS[name]["state_dict"]), strict=True)
    with torch.no_grad():
        logits = model.eval()(reference_input())
    assert_close_to_published(logits, name)


@pytest.mark.parametrize("name", TEACHERS)
def test_checkpoint_in_the_published_format_loads(name, tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": reference_fill(LAYOUTS[name]["state_dict"]), "best_acc": 0.0}, path)
    model = create_model(name, num_classes=100)
    load_weights(model, path)
    with torch.no_grad():
        assert_close_to_published(model.eval()(reference_input()), name)


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": reference_fill(LAYOUTS["resnet8x4"]["state_dict"])}, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(create_model("resnet32x4", num_classes=100), path)


# Rounded counts in the papers' tables (CRD, DKD, …) for CIFAR-100: resnet32x4 7.43M, resnet8x4 1.23M, wrn_40_2 2.26M,
# wrn_16_2 0.70M; the exact counts of every model are the manifest's.
PAPER_PARAMS_M = {"resnet32x4": 7.43, "resnet8x4": 1.23, "wrn_40_2": 2.26, "wrn_16_2": 0.70}


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts(name):
    count = sum(p.numel() for p in create_model(name, num_classes=100).parameters())
    assert count == LAYOUTS[name]["params"]
    if name in PAPER_PARAMS_M:
        assert round(count / 1e6, 2) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", ZOO)
def test_output_shapes(name):
    for num_classes, in_chans in ((10, 3), (100, 3), (10, 1)):
        model = create_model(name, num_classes=num_classes, in_chans=in_chans)
        assert model(torch.randn(2, in_chans, 32, 32)).shape == (2, num_classes)
        classifier = model.get_classifier()
        assert classifier is model.get_submodule(model.classifier_name)
        assert isinstance(classifier, nn.Linear) and classifier.out_features == num_classes


def test_factories_default_to_cifar100():
    assert resnet32x4()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert create_model("resnet32x4", num_classes=100).get_classifier().out_features == 100


def capture(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[n] for n in names]


@pytest.mark.parametrize("name", ZOO)
def test_stage_names_give_the_stage_features(name):
    model = create_model(name, num_classes=100).eval()
    stages, preact = model.stage_names(), model.stage_names(preact=True)
    modules = dict(model.named_modules())
    assert len(stages) == len(preact) >= 4 and set(stages + preact) <= set(modules)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = capture(model, stages + preact + [model.embedding_name], x)
    post, pre, embedding = feats[:len(stages)], feats[len(stages):-1], feats[-1]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in post)
    sizes = [f.shape[-1] for f in post]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert [f.shape for f in pre] == [f.shape for f in post]
    assert embedding.shape == (2, model.get_classifier().in_features)
    with torch.no_grad():
        assert torch.allclose(model.get_classifier()(embedding), model(x))


@pytest.mark.parametrize("name", ["resnet20", "ResNet50", "vgg8", "ShuffleV1"])
def test_stage_outputs_are_the_preactivations_after_relu(name):
    model = create_model(name, num_classes=100).eval()
    with torch.no_grad():
        feats = capture(model, model.stage_names() + model.stage_names(preact=True), torch.randn(2, 3, 32, 32))
    post, pre = feats[:len(feats) // 2], feats[len(feats) // 2:]
    for stage, before in zip(post[1:], pre[1:]):
        assert before.min() < 0
        assert torch.equal(stage, F.relu(before))
