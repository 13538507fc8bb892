"""The ``lightning-kd`` program (also ``python -m lightning_kd``): the LightningCLI subcommands
(:class:`~lightning_kd.cli.DistillationCLI`), ``lightning-kd run EXPERIMENT.yaml`` (:mod:`lightning_kd.runner`) and
``lightning-kd export CHECKPOINT OUTPUT`` (:func:`~lightning_kd.cli.export_student`)."""

from __future__ import annotations

import argparse
import sys

from lightning_kd.cli import DistillationCLI, export_student


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


__all__ = ["console_main", "main"]
