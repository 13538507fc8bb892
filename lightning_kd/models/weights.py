"""Loading weights files into models: Lightning checkpoints, plain state dicts, and the dicts of other
projects (weights under ``"model"`` or ``"state_dict"``, with wrapper prefixes)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.", "student.")


def extract_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model weights inside a checkpoint: a plain state dict, a dict holding it under ``"state_dict"``
    (Lightning) or ``"model"`` (the CIFAR KD repos' ``ckpt_epoch_240.pth``), with ``module.``,
    ``_orig_mod.``, ``model.`` and ``student.`` prefixes stripped. From a checkpoint of a distillation
    module this gives its student (the ``teacher.*`` entries are dropped)."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor) and not k.startswith("teacher.")}
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, role: str = "teacher", argument: str | None = None) -> None:
    """Load the weights file at ``path`` into ``model`` strictly, with an error that shows what does not fit;
    ``role`` names the model and ``argument`` the argument that gave ``path`` (``<role>_weights`` by default)."""
    argument = argument or f"{role}_weights"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument} file {str(path)!r} does not exist: pass the path of a Lightning "
                                "checkpoint, a state dict, or a dict holding the weights under 'model'/'state_dict'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a Lightning checkpoint may pickle hyper-parameters that weights_only refuses
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = extract_state_dict(checkpoint)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if keys]
        raise ValueError(f"{argument} {str(path)!r} does not fit the {role} "
                         f"({type(model).__name__}): {'; '.join(parts)}. Check that the {role} architecture "
                         "and num_classes are the ones the weights were trained with.")
    model.load_state_dict(state, strict=True)
