import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

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


def random_loader(num_classes: int, samples: int = 8, batch_size: int = 4) -> DataLoader:
    """Random 3×32×32 images with random labels (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(0, num_classes, (samples,), generator=generator)),
                      batch_size=batch_size)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def value_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x)`` and its gradient with respect to ``x``."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


def assert_matches_naive(fn_code, fn_naive, x64: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5,
                         grad_floor: float = 1e-3) -> None:
    """Value and gradient of the float32 code on ``x64.float()`` against the naive float64 form on ``x64``; the
    gradient's absolute tolerance is 1e-4 × max(largest reference gradient, ``grad_floor``)."""
    out, grad = value_and_grad(fn_code, x64.float())
    ref, ref_grad = value_and_grad(fn_naive, x64)
    assert out.dtype == torch.float32
    assert out.shape == ()
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    scale = max(ref_grad.abs().max().item(), grad_floor)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=1e-4 * scale)
    assert grad.abs().sum() > 0
