"""The ``lightning-kd`` command (also ``python -m lightning_kd``).

``lightning-kd fit|validate|test|predict ...`` is a :class:`~lightning.pytorch.cli.LightningCLI`: ``--model KD``
or a class path, ``--data`` likewise, trainer flags as usual, ``--config`` for YAML fragments.
``lightning-kd run EXPERIMENT.yaml`` runs an experiment file (teacher, then every run) through the same path,
and ``lightning-kd export CHECKPOINT OUTPUT`` writes a checkpoint's student as a plain ``state_dict``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_kd.methods import DistillationModule

EXTRA_COMMANDS = """other commands:
  lightning-kd run EXPERIMENT.yaml     train a teacher (or reuse it), then every run of the file; print a table
  lightning-kd export CKPT OUTPUT.pt   save the student of a checkpoint as a plain state_dict"""


class DistillationCLI(LightningCLI):
    """LightningCLI for distillation modules: links the data module's ``num_classes`` and ``in_chans`` to the
    model so models built by name get the right shapes."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", DistillationModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"epilog": EXTRA_COMMANDS})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(model_from_checkpoint(argv))

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.in_chans", compute_fn=lambda data: getattr(data, "in_chans", 3),
                              apply_on="instantiate")


def model_from_checkpoint(argv: list[str]) -> list[str]:
    """For ``validate``/``test``/``predict`` with ``--ckpt_path`` and no ``--model``: add the ``--model`` that the
    checkpoint's saved hyper-parameters describe (method, model names, ``teacher_weights``, loss weights), so the
    checkpoint alone rebuilds everything."""
    if argv[:1] not in (["validate"], ["test"], ["predict"]) or any(a.startswith("--model") for a in argv):
        return argv
    ckpt_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if "--ckpt_path" in argv[:-1]:
        ckpt_path = argv[argv.index("--ckpt_path") + 1]
    if ckpt_path is None or not os.path.isfile(ckpt_path):
        return argv
    hparams = dict(torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {}))
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        return argv
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in ("num_classes", "in_chans")}
    return [argv[0], "--model", json.dumps({"class_path": class_path, "init_args": init_args}), *argv[1:]]


def export_student(checkpoint_path: str, output_path: str) -> dict[str, torch.Tensor]:
    """Write the student weights of a distillation checkpoint to ``output_path`` as a plain ``state_dict`` (for the
    online methods, the peer with the best validation accuracy, as their ``export_student``)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "student."
    accuracy = state.get("peer_val_acc")
    if accuracy is not None:
        best = int(torch.nan_to_num(accuracy.float(), nan=-1.0).argmax())
        prefix = "student." if best == 0 else f"peers.{best - 1}."
    student = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not student:
        raise ValueError(f"{checkpoint_path!r} holds no 'student.*' weights: is it a lightning-kd checkpoint?")
    torch.save(student, output_path)
    return student


def _export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-kd export", description=export_student.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint written by lightning-kd fit")
    parser.add_argument("output", help="where to write the student's state_dict (.pt)")
    args = parser.parse_args(argv)
    state = export_student(args.checkpoint, args.output)
    print(f"wrote {len(state)} tensors of the student to {args.output}")


def main(args: list[str] | None = None) -> DistillationCLI | None:
    """Entry point of ``lightning-kd``; returns the CLI object for the LightningCLI subcommands."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["run"]:
        from lightning_kd.runner import main as run_main

        run_main(argv[1:])
    elif argv[:1] == ["export"]:
        _export_main(argv[1:])
    else:
        return DistillationCLI(args=argv)
    return None


def console_main() -> None:
    """The ``lightning-kd`` console script: :func:`main` with exit status 0 on success (the script exits with
    whatever it returns, and a CLI object would read as a failure)."""
    main()


__all__ = ["DistillationCLI", "console_main", "export_student", "main"]
