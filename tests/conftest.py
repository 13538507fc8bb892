import lightning as L
import pytest
import torch

from lightning_kd.data import DigitsDataModule
from lightning_kd.models import create_model


def make_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer for tests."""
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture
def teacher_in_train_mode() -> torch.nn.Module:
    """A BatchNorm teacher handed over freshly built, i.e. in train mode."""
    torch.manual_seed(0)
    teacher = create_model("cnn_small", num_classes=10, in_chans=1)
    assert teacher.training
    return teacher
