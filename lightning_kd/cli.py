"""The LightningCLI behind the ``lightning-kd`` command, and exporting a checkpoint's student.

``lightning-kd fit|validate|test|predict ...`` is a :class:`DistillationCLI`: ``--model KD`` or a class path,
``--data`` likewise, trainer flags as usual, ``--config`` for YAML fragments. The program itself (the ``run`` and
``export`` commands beside these) is :mod:`lightning_kd.entry`. Checkpoints are always read with
``weights_only=True``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_kd.checks import InputChecks
from lightning_kd.methods import DistillationModule
from lightning_kd.models.weights import load_checkpoint

EXTRA_COMMANDS = """other commands:
  lightning-kd run EXPERIMENT.yaml     train a teacher (or reuse it), then every run of the file; print a table
  lightning-kd export CKPT OUTPUT.pt   save the student of a checkpoint as a plain state_dict"""


class DistillationCLI(LightningCLI):
    """LightningCLI for distillation modules: links the data module's ``num_classes`` and ``in_chans`` to the
    model so models built by name get the right shapes, checks the batches (:class:`~lightning_kd.checks.InputChecks`)
    and reads ``--ckpt_path`` with ``weights_only=True`` only (``--weights_only false`` is refused)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", DistillationModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"epilog": EXTRA_COMMANDS})
        kwargs.setdefault("trainer_defaults", {"callbacks": [InputChecks()]})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(model_from_checkpoint(argv))
        subcommand = self.config.get("subcommand")
        if subcommand and "weights_only" in self.config[subcommand]:
            if self.config[subcommand].weights_only is False:
                raise ValueError("--weights_only false would unpickle arbitrary objects from --ckpt_path, which can run "
                                 "code from the file; lightning-kd reads checkpoints with weights_only=True only. "
                                 "Checkpoints written by lightning-kd load that way; convert another file by saving "
                                 "its state_dict() in a trusted session")
            self.config[subcommand].weights_only = True

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.in_chans", compute_fn=lambda data: getattr(data, "in_chans", 3),
                              apply_on="instantiate")


def _ckpt_path(argv: list[str]) -> str | None:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if "--ckpt_path" in argv[:-1]:
        path = argv[argv.index("--ckpt_path") + 1]
    return path


def model_from_checkpoint(argv: list[str]) -> list[str]:
    """For ``validate``/``test``/``predict`` with ``--ckpt_path`` and no ``--model``: add the ``--model`` that the
    checkpoint's saved hyper-parameters describe (method, model names, ``teacher_weights``, loss weights), so the
    checkpoint alone rebuilds everything. Any ``--ckpt_path`` file is checked first (a file that is missing
    nothing but would need unpickling code, or a truncated one, stops here with its error)."""
    if argv[:1] not in (["fit"], ["validate"], ["test"], ["predict"]):
        return argv
    ckpt_path = _ckpt_path(argv)
    if ckpt_path is None or not os.path.isfile(ckpt_path):
        return argv
    checkpoint = load_checkpoint(ckpt_path, "--ckpt_path")
    if argv[0] == "fit" or any(a.startswith("--model") for a in argv):
        return argv
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        return argv
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in ("num_classes", "in_chans")}
    return [argv[0], "--model", json.dumps({"class_path": class_path, "init_args": init_args}), *argv[1:]]


def module_from_checkpoint(checkpoint_path: str | os.PathLike) -> DistillationModule:
    """The distillation module a ``lightning-kd fit`` checkpoint describes (its ``_class_path`` hyper-parameter),
    with the checkpoint's weights, read with ``weights_only=True``. The teacher is built by name but its
    ``teacher_weights`` file is not read (the checkpoint's own ``teacher.*`` weights load when it holds them)."""
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path is None:
        raise ValueError(f"{str(checkpoint_path)!r} does not name the module that wrote it (no '_class_path' "
                         "hyper-parameter, as in checkpoints of lightning-kd fit): call export_student() on the module "
                         "in Python instead")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{str(checkpoint_path)!r} was written by {class_path}, which cannot be imported here "
                         f"({error}): install the package that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, DistillationModule)):
        raise ValueError(f"{str(checkpoint_path)!r} names {class_path}, which is not a distillation module")
    overrides: dict[str, Any] = {"teacher_weights": None} if "teacher_weights" in hparams else {}
    try:
        module = cls.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True, strict=False,
                                          **overrides)
    except Exception as error:
        raise ValueError(f"{str(checkpoint_path)!r} cannot rebuild its {class_name} ({type(error).__name__}: "
                         f"{error}): export the student in Python with module.export_student(path)") from error
    state = checkpoint.get("state_dict", {})
    missing = [k for k in module.state_dict() if k.startswith(("student.", "peers.")) and k not in state]
    if missing:
        raise ValueError(f"{str(checkpoint_path)!r} lacks student weights its {class_name} needs "
                         f"({', '.join(missing[:5])}): is it a checkpoint of this module?")
    return module


def export_student(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Write the student weights of a distillation checkpoint to ``output_path`` as a plain ``state_dict``.

    A ``lightning-kd fit`` checkpoint rebuilds its module (:func:`module_from_checkpoint`), whose own
    ``export_student`` chooses what to write (for the online methods, the peer with the best validation
    accuracy). A checkpoint without a module name (saved from Python) gives its ``student.*`` weights."""
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "_class_path" in hparams:
        module_from_checkpoint(checkpoint_path).export_student(output_path)
        return load_checkpoint(output_path)
    state = checkpoint.get("state_dict", checkpoint)
    if "peer_val_acc" in state:
        raise ValueError(f"{str(checkpoint_path)!r} holds several peers but not the module that chooses among them (no "
                         "'_class_path' hyper-parameter): call export_student() on the module in Python, or export "
                         "a checkpoint written by lightning-kd fit")
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    if not student:
        raise ValueError(f"{str(checkpoint_path)!r} holds no 'student.*' weights: is it a lightning-kd checkpoint?")
    torch.save(student, output_path)
    return student


def __getattr__(name: str) -> Any:
    # the program's entry points live in lightning_kd.entry; these names stay importable from here
    if name in ("main", "console_main"):
        from lightning_kd import entry

        return getattr(entry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DistillationCLI", "export_student", "model_from_checkpoint", "module_from_checkpoint"]
