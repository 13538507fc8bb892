"""Experiment files: train (or reuse) a teacher, then every run and seed, through the same LightningCLI path as
``lightning-kd fit``; record each run, and write a markdown table and a plot.

An experiment file::

    output_dir: runs/digits-quickstart      # records, teacher weights, table, plot and logs go here
    common:                                 # arguments of the teacher and of every run
      data: configs/data/digits.yaml
      trainer: configs/trainer/cpu_quick.yaml
    seeds: [0, 1, 2]
    defaults: {model.student: cnn_tiny}     # arguments of every run (before the run's own)
    teacher: {model: Supervised, model.student: cnn_large}   # trained once (first seed) and cached
    # or a trained teacher: {model.student: cnn_large, weights: path/to/teacher.pt}
    runs:
      student alone: {model: Supervised}
      KD: {model: KD, model.temperature: 2}

Each run is a mapping of CLI arguments (``{"model": "KD", "model.temperature": 4}`` is
``--model KD --model.temperature 4``; a YAML file for a group, ``{"data": "configs/data/digits.yaml"}``, is
``--data configs/data/digits.yaml``; ``config: [file, ...]`` adds ``--config file`` first). Runs get the teacher as ``model.teacher`` and ``model.teacher_weights``
unless they set ``model.teacher`` themselves. Every finished (run, seed) is appended to ``results.jsonl`` with
its resolved config, and is not run again while its arguments and config files are unchanged, so an
interrupted sweep resumes where it stopped (``--overwrite`` reruns everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from lightning.pytorch.callbacks import Callback

COLUMNS = {
    "test/acc": "top-1 last (%)",
    "best_val_acc": "top-1 best epoch (%)",
    "test/agreement": "agreement (%)",
    "wall_time_s": "time (s)",
}
PERCENT = {"test/acc", "best_val_acc", "test/agreement"}


class ValidationHistory(Callback):
    """Collects ``val/acc`` after every validation epoch (sanity checks excluded)."""

    def __init__(self):
        self.accuracies: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self.accuracies.append(float(trainer.callback_metrics["val/acc"]))


def _arguments(mapping: dict[str, Any]) -> list[str]:
    args = []
    for key, value in mapping.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    for path in re.findall(r"[\w./-]+\.ya?ml", text):
        if Path(path).is_file():
            text += Path(path).read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def fit_and_test(args: list[str], root: Path, seed: int) -> tuple[dict[str, Any], Any]:
    """``lightning-kd fit`` with ``args``, then ``test`` on the final weights. Returns the record (test metrics,
    per-epoch validation accuracy, best of it, wall time, resolved config) and the fitted module."""
    from lightning_kd.cli import DistillationCLI

    start = time.perf_counter()
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the arguments are ``args``, not this process's
        cli = DistillationCLI(args=[*args, "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)],
                              run=False)
    history = ValidationHistory()
    cli.trainer.callbacks.append(history)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    record: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    record["val_acc"] = history.accuracies
    if history.accuracies:
        record["best_val_acc"] = max(history.accuracies)
        record["best_epoch"] = history.accuracies.index(record["best_val_acc"])
    record["wall_time_s"] = time.perf_counter() - start
    record["config"] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))
    return record, cli.model


def _common_arguments(spec: dict[str, Any]) -> list[str]:
    fragments = [arg for fragment in spec.get("config", []) for arg in ("--config", fragment)]
    return fragments + _arguments(spec.get("common", {}))


def run_arguments(spec: dict[str, Any], teacher_weights: str | Path) -> list[tuple[str, list[str]]]:
    """The CLI arguments of every run of an experiment ``spec``, in order: ``("teacher", args)`` first unless the
    teacher is given as a weights file, then each run (which gets the teacher as ``teacher_weights``)."""
    common, teacher = _common_arguments(spec), spec["teacher"]
    runs = [] if "weights" in teacher else [("teacher", common + _arguments(teacher))]
    for name, run in spec["runs"].items():
        run = {**spec.get("defaults", {}), **run}
        args = common + _arguments(run)
        if run.get("model.teacher") is None:
            args += ["--model.teacher", teacher["model.student"], "--model.teacher_weights", str(teacher_weights)]
        runs.append((name, args))
    return runs


def run_experiment(path: str | Path, overwrite: bool = False, console: Any = None) -> list[dict[str, Any]]:
    """Run every (run, seed) of the experiment file at ``path`` that is not recorded yet; return all records."""
    spec = yaml.safe_load(Path(path).read_text())
    output_dir = Path(spec.get("output_dir", Path("runs") / Path(path).stem))
    output_dir.mkdir(parents=True, exist_ok=True)
    seeds = spec.get("seeds", [0])
    results_file = output_dir / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = set() if overwrite else {(r["run"], r["seed"], r["fingerprint"]) for r in records}

    teacher_spec = spec["teacher"]
    teacher_model = teacher_spec["model.student"]
    if "weights" in teacher_spec:
        teacher_weights, teacher_key = Path(teacher_spec["weights"]), _fingerprint(teacher_spec)
    else:
        teacher_args = _common_arguments(spec) + _arguments(teacher_spec)
        teacher_key = _fingerprint(teacher_args, seeds[0])
        teacher_weights = output_dir / f"teacher-{teacher_key}.pt"
        if not teacher_weights.exists() or ("teacher", seeds[0], teacher_key) not in done:
            _announce(console, "teacher", seeds[0], 0, 0)
            record, module = fit_and_test(teacher_args, output_dir / "teacher", seeds[0])
            module.export_student(teacher_weights)
            records.append(_record(results_file, "teacher", seeds[0], teacher_key, teacher_model, record))

    todo = []
    for name, args in run_arguments(spec, teacher_weights):
        if name == "teacher":
            continue
        model = {**spec.get("defaults", {}), **spec["runs"][name]}.get("model.student", "?")
        for seed in seeds:
            key = _fingerprint(args, seed, teacher_key)
            if (name, seed, key) not in done:
                todo.append((name, seed, key, args, model))
    for i, (name, seed, key, args, model) in enumerate(todo, 1):
        _announce(console, name, seed, i, len(todo))
        record, _ = fit_and_test(args, output_dir / _slug(name) / f"seed{seed}", seed)
        records.append(_record(results_file, name, seed, key, model, record))
    return records


def _announce(console: Any, name: str, seed: int, index: int, total: int) -> None:
    if console is not None:
        step = f"{index}/{total} · " if total else ""
        console.rule(f"[bold]{step}{name}[/bold] · seed {seed}")


def _record(results_file: Path, name: str, seed: int, key: str, model: str, metrics: dict[str, Any]) -> dict:
    record = {"run": name, "seed": seed, "fingerprint": key, "model": model, **metrics}
    with results_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def latest_records(records: list[dict[str, Any]], run_names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The last record of each (run, seed), grouped by run in ``run_names`` order (runs without records left
    out)."""
    latest: dict[tuple[str, int], dict] = {}
    for record in records:
        latest[(record["run"], record["seed"])] = record
    grouped = {name: [r for (run, _), r in latest.items() if run == name] for name in run_names}
    return {name: rows for name, rows in grouped.items() if rows}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _cell(values: list[float], percent: bool) -> str:
    if not values:
        return "—"
    scale, digits = (100, 2) if percent else (1, 0)
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(records: list[dict[str, Any]], run_names: list[str]) -> str:
    """A markdown table, one row per run in ``run_names`` order: model, mean (± sample std over seeds) of test
    top-1 at the last epoch, of the best epoch's validation top-1, of the agreement with the teacher, of the
    wall time, and the number of seeds."""
    lines = ["| run | model | " + " | ".join(COLUMNS.values()) + " | seeds |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, rows in latest_records(records, run_names).items():
        cells = [_cell([r[k] for r in rows if k in r], k in PERCENT) for k in COLUMNS]
        lines.append(f"| {name} | {rows[0]['model']} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines)


def plot_results(records: list[dict[str, Any]], run_names: list[str], path: str | Path) -> None:
    """A PNG with two panels: last-epoch test top-1 per run (mean, error bar = std over seeds), and validation
    top-1 per epoch (mean over seeds) for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = latest_records(records, run_names)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    stats = [mean_std([100 * r["test/acc"] for r in rows]) for rows in grouped.values()]
    bars.bar(range(len(stats)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="tab:blue")
    bars.set_xticks(range(len(stats)), list(grouped), rotation=30, ha="right")
    low = min(m - s for m, s in stats) if stats else 0
    bars.set_ylim(max(0.0, low - 2), 100)
    bars.set_ylabel("test top-1, last epoch (%)")
    for name, rows in grouped.items():
        length = min((len(r.get("val_acc", [])) for r in rows), default=0)
        if length:
            mean_curve = [100 * sum(r["val_acc"][e] for r in rows) / len(rows) for e in range(length)]
            curves.plot(range(1, length + 1), mean_curve, label=name)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation top-1 (%)")
    curves.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(records: list[dict[str, Any]], run_names: list[str], output_dir: str | Path) -> str:
    """Write ``results.md`` and ``results.png`` to ``output_dir``; return the table."""
    table = results_table(records, run_names)
    Path(output_dir, "results.md").write_text(table + "\n")
    plot_results(records, run_names, Path(output_dir, "results.png"))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-kd run", description=run_experiment.__doc__)
    parser.add_argument("experiment", help="an experiment YAML file, e.g. configs/experiments/digits/quickstart.yaml")
    parser.add_argument("--overwrite", action="store_true", help="rerun runs that are already recorded")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    records = run_experiment(args.experiment, overwrite=args.overwrite, console=console)
    spec = yaml.safe_load(Path(args.experiment).read_text())
    output_dir = Path(spec.get("output_dir", Path("runs") / Path(args.experiment).stem))
    table = report(records, ["teacher", *spec["runs"]], output_dir)
    print()
    print(table)
    print(f"\nrecords: {output_dir / 'results.jsonl'}; table and plot: {output_dir / 'results.md'}, "
          f"{output_dir / 'results.png'}")
