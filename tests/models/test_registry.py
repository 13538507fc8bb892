import pytest
import torch

from lightning_kd.models import create_model, list_models, register_model


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_chans,size", [(1, 8), (3, 8)])
def test_every_registered_model_builds_and_classifies(name, in_chans, size):
    model = create_model(name, num_classes=7, in_chans=in_chans)
    logits = model(torch.randn(2, in_chans, size, size))
    assert logits.shape == (2, 7)
    assert model.get_classifier().out_features == 7
    names = dict(model.named_modules())
    assert all(name in names for name in model.stage_names()) and model.embedding_name in names


@pytest.mark.parametrize("name,expected", [("mlp", 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10),
                                           ("cnn_tiny", 1 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 10 + 10)])
def test_parameter_counts(name, expected):
    model = create_model(name, num_classes=10, in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_list_models_filters_by_pattern():
    assert list_models("cnn_*") == ["cnn_large", "cnn_small", "cnn_tiny"]
    assert list_models("nothing*") == []


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown model 'cnn_smal'\. Did you mean 'cnn_small'"):
        create_model("cnn_smal")


def test_timm_and_torchvision_models_by_name():
    timm_model = create_model("timm:resnet18", num_classes=5, in_chans=1)
    assert timm_model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    tv_model = create_model("torchvision:resnet18", num_classes=5)
    assert tv_model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
        create_model("torchvision:resnet19")


def test_register_model_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        @register_model
        def mlp(num_classes=10, in_chans=3):  # noqa: F811
            return torch.nn.Linear(in_chans, num_classes)
