"""Loading weights files into models: Lightning checkpoints, plain state dicts, ``.safetensors`` files, and the
dicts of other projects (weights under ``"model"`` or ``"state_dict"``, with wrapper prefixes).

Every file is read with ``torch.load(..., weights_only=True)`` (tensors, numbers, strings and containers only):
a file that would need to run code while unpickling is refused with :class:`UnsafeCheckpointError`, never executed.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.", "student.")

CONVERT_HINT = ("if you trust the file, load it once in a trusted Python session (torch.load(path, weights_only=False)) "
                "and save what you need as plain tensors: torch.save(model.state_dict(), 'weights.pt') or "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A weights or checkpoint file that holds pickled objects beyond tensors, numbers, strings and containers:
    loading it would run code from the file, so it is refused."""


class CorruptCheckpointError(ValueError):
    """A weights or checkpoint file that cannot be read: truncated, corrupted, or not a PyTorch/safetensors file."""


def load_checkpoint(path: str | os.PathLike, argument: str = "checkpoint") -> dict[str, Any]:
    """The object in the weights or checkpoint file at ``path``, on the CPU, read without running code from it:
    ``.safetensors`` through safetensors, anything else with ``torch.load(weights_only=True)``. ``argument`` names
    what gave the path in the errors (a missing, unsafe, truncated or corrupted file each give one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} file {str(path)!r} does not exist: pass the path of a Lightning "
                                "checkpoint, a state dict (.pt/.pth/.ckpt or .safetensors), or a dict holding the "
                                "weights under 'model'/'state_dict'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for a bad header or size
            raise CorruptCheckpointError(f"{argument} {str(path)!r} is not a readable safetensors file "
                                         f"({_first_line(error)}): it is truncated or corrupted; write it again "
                                         "(safetensors.torch.save_file) or copy it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise UnsafeCheckpointError(
                f"{argument} {str(path)!r} holds pickled Python objects that a weights-only load refuses "
                f"({_refused_global(error)}); it is not loaded, because unpickling them could run code from the "
                f"file. To convert it: {CONVERT_HINT}") from None
        raise _corrupt(argument, path, error) from None
    except (RuntimeError, EOFError, IndexError, ValueError, KeyError, OSError) as error:
        raise _corrupt(argument, path, error) from None


def _corrupt(argument: str, path: Path, error: BaseException) -> CorruptCheckpointError:
    size = path.stat().st_size
    return CorruptCheckpointError(f"{argument} {str(path)!r} ({size} bytes) cannot be read: it is truncated or "
                                  f"corrupted, or not a PyTorch file ({type(error).__name__}: {_first_line(error)}). "
                                  "Copy or write it again; a run interrupted while saving leaves such a file")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "empty file"


def _refused_global(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")[:200]
    return "a class or function"


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
    """Load the weights file at ``path`` (see :func:`load_checkpoint`) into ``model`` strictly, with an error that
    shows what does not fit; ``role`` names the model and ``argument`` the argument that gave ``path``
    (``<role>_weights`` by default)."""
    argument = argument or f"{role}_weights"
    checkpoint = load_checkpoint(path, argument)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{argument} {str(path)!r} holds a {type(checkpoint).__name__}, not a dict of weights: save "
                         "the model's state_dict() instead")
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
