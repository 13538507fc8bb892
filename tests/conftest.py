from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.data import CIFAR10DataModule, DigitsDataModule
from lightning_kd.data.views import StrongViewDataModule
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


def hooked_features(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``names`` (inputs, cloned, for ``name:input``) recorded with plain forward hooks in one pass: an
    independent check of :func:`lightning_kd.features.capture_features`."""
    modules, out, handles = dict(model.named_modules()), {}, []
    for name in names:
        if name.endswith(":input"):
            hook = lambda m, args, name=name: out.__setitem__(name, args[0].clone())  # noqa: E731
            handles.append(modules[name[:-len(":input")]].register_forward_pre_hook(hook))
        else:
            hook = lambda m, args, output, name=name: out.__setitem__(name, output)  # noqa: E731
            handles.append(modules[name].register_forward_hook(hook))
    model(x)
    for handle in handles:
        handle.remove()
    return [out[name] for name in names]


def assert_parts_checkpointed(trainer: L.Trainer, model, state: dict[str, torch.Tensor], tmp_path):
    """A method's trainable parts (``state``, checkpoint keys to tensors) are in its checkpoint, the teacher is not,
    the exported student is the student alone, and ``load_from_checkpoint`` (with the input shape stored at setup)
    restores parts and student. Returns the checkpoint and the restored model."""
    trainer.save_checkpoint(tmp_path / "method.ckpt")
    checkpoint = torch.load(tmp_path / "method.ckpt", weights_only=True)
    assert tuple(checkpoint["hyper_parameters"]["input_shape"]) == (1, 8, 8)
    saved = checkpoint["state_dict"]
    assert state and all(torch.equal(saved[k], v) for k, v in state.items())
    assert not any(k.startswith("teacher.") for k in saved)
    model.export_student(tmp_path / "student.pt")
    assert set(torch.load(tmp_path / "student.pt", weights_only=True)) == set(model.student.state_dict())
    restored = type(model).load_from_checkpoint(tmp_path / "method.ckpt")
    for key, value in {**state, **{f"student.{k}": v for k, v in model.student.state_dict().items()}}.items():
        assert torch.equal(restored.state_dict()[key], value), key
    return checkpoint, restored


class RandomSplit:
    """A split as torchvision's CIFAR keeps it: ``data`` (N×32×32×3 uint8) and ``targets``, random (fixed seed)."""

    def __init__(self, n: int, seed: int, num_classes: int = 10):
        generator = np.random.default_rng(seed)
        self.data = generator.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = generator.integers(0, num_classes, n).tolist()

    def __len__(self) -> int:
        return len(self.targets)


class RandomCIFAR10(CIFAR10DataModule):
    """The CIFAR-10 data module on ``num_train`` / ``num_test`` random images held in memory (the device-resident
    path reads only the splits' ``data`` and ``targets``)."""

    num_train, num_test = 24, 8

    def prepare_data(self) -> None:
        pass

    def load_split(self, train: bool) -> RandomSplit:
        return RandomSplit(self.num_train if train else self.num_test, seed=int(train))


class PILSplit(RandomSplit):
    """A random CIFAR split whose items are ``(PIL image, target)``, as torchvision's CIFAR gives them."""

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


class PILCIFAR10(RandomCIFAR10):
    """The CIFAR-10 data module on random images held in memory, with the per-sample PIL pipeline."""

    def load_split(self, train: bool) -> PILSplit:
        return PILSplit(self.num_train if train else self.num_test, seed=int(train))


def strong_data(**kwargs) -> StrongViewDataModule:
    return StrongViewDataModule(PILCIFAR10(batch_size=8, num_workers=0, **kwargs))
