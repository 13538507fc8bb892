"""A name → constructor registry in the spirit of timm's ``register_model`` / ``create_model``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__`` so ``create_model(name)`` can build it."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style ``pattern``.

    >>> "cnn_small" in list_models("cnn_*")
    True
    """
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def suggest(name: str, choices: list[str]) -> str:
    """A "did you mean" hint naming the closest of ``choices`` to ``name``."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, pretrained: str | None = None,
                 **kwargs) -> nn.Module:
    """Build a model by name.

    ``name`` is a registered model (see :func:`list_models`), ``timm:<name>`` for any timm model or
    ``torchvision:<name>`` for any torchvision classification model. Nothing is downloaded: ``pretrained`` is the
    path of a local weights file (a state dict, a Lightning checkpoint, or a dict holding the weights under
    ``"model"``/``"state_dict"``), loaded strictly after the model is built with ``num_classes`` outputs.

    >>> import torch
    >>> create_model("mlp", num_classes=10, in_chans=1)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if pretrained is True:
        raise ValueError("pretrained=True would download weights: pass the path of a local weights file instead")
    model = _build(name, num_classes, in_chans, **kwargs)
    if pretrained:
        from lightning_kd.models.weights import load_weights

        load_weights(model, pretrained, role="model", argument="pretrained")
    return model


def _build(name: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model {arch!r}.{suggest(arch, timm.list_models())}")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name.startswith("torchvision:"):
        import torchvision

        arch = name[len("torchvision:"):]
        if arch not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {arch!r}.{suggest(arch, torchvision.models.list_models())}")
        if in_chans != 3:
            raise ValueError(f"torchvision model {arch!r} takes 3 input channels, not {in_chans}; use a timm model or "
                             "a registered model for other inputs")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}.{suggest(name, list_models())} "
                         "See lightning_kd.models.list_models(), or use 'timm:<name>' / 'torchvision:<name>'.")
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
