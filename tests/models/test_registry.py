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
    assert list_models("cnn_*") == ["cnn_large", "cnn_medium", "cnn_small", "cnn_tiny"]
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


def test_pretrained_only_from_a_local_file(tmp_path):
    source = create_model("timm:resnet18", num_classes=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    loaded = create_model("timm:resnet18", num_classes=5, pretrained=str(tmp_path / "w.pth"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), loaded.eval()(x))
    with pytest.raises(ValueError, match="would download"):
        create_model("timm:resnet18", pretrained=True)
    with pytest.raises(FileNotFoundError, match="pretrained file .*does not exist"):
        create_model("resnet8", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'"):
        create_model("timm:resnet19")


@pytest.mark.parametrize("student,teacher", [("timm:resnet10t", "torchvision:resnet18"),
                                             ("torchvision:mobilenet_v3_small", "timm:resnet10t")])
def test_timm_and_torchvision_models_as_teacher_and_student(student, teacher):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_kd.methods import KD

    model = KD(student=student, teacher=teacher, num_classes=4)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 4), batch_size=4)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])
    assert not model.teacher.training and "val/agreement" in trainer.callback_metrics
