"""Experiment files: train (or reuse) a teacher, then every run, through the same LightningCLI path as
``lightning-kd fit``, and print a markdown table.

An experiment file::

    output_dir: runs/digits-quickstart      # results, teacher weights and logs go here
    config: [configs/data/digits.yaml]      # fragments every run starts from (as ``--config``)
    seeds: [0]
    defaults: {model.student: cnn_small}    # arguments of every run (before the run's own)
    teacher: {model: Supervised, model.student: cnn_large}
    runs:
      student alone: {model: Supervised}
      KD: {model: KD}

Each run is a mapping of CLI arguments (``{"model": "KD", "model.temperature": 4}`` is
``--model KD --model.temperature 4``). Runs whose method needs a teacher get the trained teacher as
``model.teacher`` and ``model.teacher_weights``. Finished runs are recorded in ``results.jsonl`` and not run
again while their arguments are unchanged (``--overwrite`` reruns them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import yaml


REPORTED = {"test/acc": "top-1 (%)", "test/agreement": "agreement (%)"}


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


def fit_and_test(args: list[str], root: Path, seed: int) -> tuple[dict[str, float], Any]:
    """``lightning-kd fit`` with ``args``, then ``test`` on the trained weights; returns the test metrics and
    the fitted module."""
    from lightning_kd.cli import DistillationCLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the arguments are ``args``, not this process's
        cli = DistillationCLI(args=[*args, "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)],
                              run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}, cli.model


def run_experiment(path: str | Path, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every (run, seed) of the experiment file at ``path`` not yet recorded; return all records."""
    spec = yaml.safe_load(Path(path).read_text())
    output_dir = Path(spec.get("output_dir", Path("runs") / Path(path).stem))
    output_dir.mkdir(parents=True, exist_ok=True)
    fragments = [arg for fragment in spec.get("config", []) for arg in ("--config", fragment)]
    seeds, defaults = spec.get("seeds", [0]), spec.get("defaults", {})
    results_file = output_dir / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {(r["run"], r["seed"], r["fingerprint"]) for r in records} if not overwrite else set()

    teacher_spec = spec["teacher"]
    teacher_args = fragments + _arguments(teacher_spec)
    teacher_key = _fingerprint(teacher_args, seeds[0])
    teacher_weights = output_dir / f"teacher-{teacher_key}.pt"
    if overwrite or not teacher_weights.exists() or ("teacher", seeds[0], teacher_key) not in done:
        metrics, module = fit_and_test(teacher_args, output_dir / "teacher", seeds[0])
        module.export_student(teacher_weights)
        records.append(_record(results_file, "teacher", seeds[0], teacher_key, teacher_spec["model.student"], metrics))

    teacher_model = teacher_spec["model.student"]
    for name, run in spec["runs"].items():
        run = {**defaults, **run}
        args = fragments + _arguments(run)
        if run.get("model.teacher") is None:
            args += ["--model.teacher", teacher_model, "--model.teacher_weights", str(teacher_weights)]
        for seed in seeds:
            key = _fingerprint(args, seed, teacher_key)
            if (name, seed, key) in done:
                continue
            metrics, _ = fit_and_test(args, output_dir / _slug(name) / f"seed{seed}", seed)
            records.append(_record(results_file, name, seed, key, run.get("model.student", "?"), metrics))
    return records


def _record(results_file: Path, name: str, seed: int, key: str, model: str, metrics: dict[str, float]) -> dict:
    record = {"run": name, "seed": seed, "fingerprint": key, "model": model, **metrics}
    with results_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def results_table(records: list[dict[str, Any]], run_names: list[str]) -> str:
    """A markdown table with one row per run (in ``run_names`` order): model, mean (± std over seeds) of each
    reported metric, and the number of seeds."""
    lines = ["| run | model | " + " | ".join(REPORTED.values()) + " | seeds |",
             "|---|---|" + "---:|" * (len(REPORTED) + 1)]
    latest: dict[tuple[str, int], dict] = {}
    for record in records:
        latest[(record["run"], record["seed"])] = record
    for name in run_names:
        rows = [r for (run, _), r in latest.items() if run == name]
        if not rows:
            continue
        cells = [_mean_std([r[k] for r in rows if k in r]) for k in REPORTED]
        lines.append(f"| {name} | {rows[0]['model']} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-kd run", description=run_experiment.__doc__)
    parser.add_argument("experiment", help="an experiment YAML file, e.g. configs/experiments/digits/quickstart.yaml")
    parser.add_argument("--overwrite", action="store_true", help="rerun runs that are already recorded")
    args = parser.parse_args(argv)
    records = run_experiment(args.experiment, overwrite=args.overwrite)
    spec = yaml.safe_load(Path(args.experiment).read_text())
    print()
    print(results_table(records, ["teacher", *spec["runs"]]))
