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

from lightning_kd.search import expand, label, select_best, sensitivity_rows

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


def _cli(args: list[str], root: Path, seed: int) -> Any:
    from lightning_kd.cli import DistillationCLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the arguments are ``args``, not this process's
        return DistillationCLI(args=[*args, "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)],
                               run=False)


def _check_validation_split(datamodule: Any) -> None:
    val_fraction = getattr(datamodule, "hparams", {}).get("val_fraction", 0)
    if not val_fraction or val_fraction <= 0:
        raise ValueError(f"a search selects on validation data, but {type(datamodule).__name__} validates on its test "
                         "split (val_fraction=0): set data.val_fraction (e.g. 0.1) in the experiment's common arguments "
                         "so that a validation split is carved from the training set")


def fit_and_test(args: list[str], root: Path, seed: int, test: bool = True) -> tuple[dict[str, Any], Any]:
    """``lightning-kd fit`` with ``args``, then ``test`` on the final weights. Returns the record (test metrics,
    per-epoch validation accuracy, best of it, wall time, resolved config) and the fitted module.

    With ``test=False`` (a search candidate) the data must have a validation split of its own, the test split is
    never read, and the student's final weights are kept in ``root/student.pt``."""
    start = time.perf_counter()
    cli = _cli(args, root, seed)
    if not test:
        _check_validation_split(cli.datamodule)
    history = ValidationHistory()
    cli.trainer.callbacks.append(history)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    record: dict[str, Any] = {}
    if test:
        record.update({k: float(v) for k, v in cli.trainer.test(cli.model, datamodule=cli.datamodule,
                                                                   verbose=False)[0].items()})
    else:
        root.mkdir(parents=True, exist_ok=True)
        cli.model.export_student(root / "student.pt")
        record["student_weights"] = str(root / "student.pt")
    record["val_acc"] = history.accuracies
    if history.accuracies:
        record["best_val_acc"] = max(history.accuracies)
        record["best_epoch"] = history.accuracies.index(record["best_val_acc"])
    record["wall_time_s"] = time.perf_counter() - start
    record["config"] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))
    return record, cli.model


def test_weights(args: list[str], root: Path, seed: int, student_weights: str) -> dict[str, Any]:
    """``test`` of the module that ``args`` describe with the student's weights from ``student_weights``."""
    import torch

    start = time.perf_counter()
    cli = _cli(args, root, seed)
    cli.model.student.load_state_dict(torch.load(student_weights, map_location="cpu", weights_only=True))
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    record: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    record["wall_time_s"] = time.perf_counter() - start
    record["config"] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))
    return record


def _common_arguments(spec: dict[str, Any]) -> list[str]:
    fragments = [arg for fragment in spec.get("config", []) for arg in ("--config", fragment)]
    return fragments + _arguments(spec.get("common", {}))


SEARCH_DEFAULTS = {"select": "last", "samples": None, "seed": 0, "seeds": None, "retrain": True}


def _search_options(spec: dict[str, Any]) -> dict[str, Any]:
    options = {**SEARCH_DEFAULTS, **spec.get("search", {})}
    unknown = set(options) - set(SEARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown search options {sorted(unknown)}; known: {sorted(SEARCH_DEFAULTS)}")
    return options


def _run_specs(spec: dict[str, Any], teacher_weights: str | Path) -> list[tuple[str, dict[str, Any], list[str],
                                                                             list[str]]]:
    """Each run as ``(name, arguments mapping with the defaults, common CLI arguments, teacher CLI arguments)``."""
    common, teacher = _common_arguments(spec), spec["teacher"]
    runs = []
    for name, run in spec["runs"].items():
        run = {**spec.get("defaults", {}), **run}
        teacher_args = [] if run.get("model.teacher") is not None else [
            "--model.teacher", teacher["model.student"], "--model.teacher_weights", str(teacher_weights)]
        runs.append((name, run, common, teacher_args))
    return runs


def run_arguments(spec: dict[str, Any], teacher_weights: str | Path) -> list[tuple[str, list[str]]]:
    """The CLI arguments of every run of an experiment ``spec``, in order: ``("teacher", args)`` first unless the
    teacher is given as a weights file, then each run (which gets the teacher as ``teacher_weights``); a run with
    searched arguments gives one entry per setting, named ``run [setting]``."""
    options, teacher = _search_options(spec), spec["teacher"]
    entries = [] if "weights" in teacher else [("teacher", _common_arguments(spec) + _arguments(teacher))]
    for name, run, common, extra in _run_specs(spec, teacher_weights):
        settings = expand(run, options["samples"], options["seed"])
        for setting in settings or [{}]:
            entry = f"{name} [{label(setting)}]" if setting else name
            entries.append((entry, common + _arguments({**run, **setting}) + extra))
    return entries


class _Executor:
    """Runs (name, args) over seeds unless already recorded, appending each record to ``results.jsonl``."""

    def __init__(self, output_dir: Path, records: list[dict[str, Any]], overwrite: bool, console: Any):
        self.output_dir, self.records, self.console = output_dir, records, console
        self.results_file = output_dir / "results.jsonl"
        self.done = {} if overwrite else {(r["run"], r["seed"], r["fingerprint"]): r for r in records}
        self.count = 0

    def __call__(self, name: str, args: list[str], seeds: list[int], key_parts: tuple, model: str,
                 test: bool = True, extra: dict[str, Any] | None = None,
                 weights_of: dict[int, str] | None = None) -> list[dict[str, Any]]:
        rows = []
        for seed in seeds:
            variant = () if test and weights_of is None else (test, weights_of and weights_of.get(seed))
            key = _fingerprint(args, seed, *key_parts, *variant)
            if (name, seed, key) in self.done:
                rows.append(self.done[(name, seed, key)])
                continue
            self.count += 1
            _announce(self.console, name, seed, self.count)
            root = self.output_dir / _slug(name) / f"seed{seed}"
            if weights_of is not None:
                metrics = test_weights(args, root, seed, weights_of[seed])
            else:
                metrics, _ = fit_and_test(args, root, seed, test=test)
            record = _record(self.results_file, name, seed, key, model, {**(extra or {}), **metrics})
            self.records.append(record)
            self.done[(name, seed, key)] = record
            rows.append(record)
        return rows


def run_experiment(path: str | Path, overwrite: bool = False, console: Any = None) -> list[dict[str, Any]]:
    """Run every (run, seed) of the experiment file at ``path`` that is not recorded yet; return all records.

    A run with searched arguments (see :mod:`lightning_kd.search`) first fits every setting on ``search.seeds``
    (default: the experiment's seeds) and scores it on the validation split only; the best setting by mean
    validation top-1 (``search.select``: ``last`` or ``best`` epoch) is then tested, as ``<run> (selected)``:
    trained again on every seed when ``search.retrain`` (the default), else the candidates' own weights."""
    spec = yaml.safe_load(Path(path).read_text())
    output_dir = Path(spec.get("output_dir", Path("runs") / Path(path).stem))
    output_dir.mkdir(parents=True, exist_ok=True)
    seeds, options = spec.get("seeds", [0]), _search_options(spec)
    results_file = output_dir / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    execute = _Executor(output_dir, records, overwrite, console)

    teacher_spec = spec["teacher"]
    teacher_model = teacher_spec["model.student"]
    if "weights" in teacher_spec:
        teacher_weights, teacher_key = Path(teacher_spec["weights"]), _fingerprint(teacher_spec)
    else:
        teacher_args = _common_arguments(spec) + _arguments(teacher_spec)
        teacher_key = _fingerprint(teacher_args, seeds[0])
        teacher_weights = output_dir / f"teacher-{teacher_key}.pt"
        if not teacher_weights.exists() or ("teacher", seeds[0], teacher_key) not in {
                (r["run"], r["seed"], r["fingerprint"]) for r in records}:
            _announce(console, "teacher", seeds[0], 0)
            record, module = fit_and_test(teacher_args, output_dir / "teacher", seeds[0])
            module.export_student(teacher_weights)
            records.append(_record(results_file, "teacher", seeds[0], teacher_key, teacher_model, record))

    for name, run, common, extra_args in _run_specs(spec, teacher_weights):
        model = run.get("model.student", "?")
        settings = expand(run, options["samples"], options["seed"])
        if not settings:
            execute(name, common + _arguments(run) + extra_args, seeds, (teacher_key,), model)
            continue
        search_seeds = options["seeds"] or seeds
        candidates, by_label = {}, {}
        for setting in settings:
            entry = f"{name} [{label(setting)}]"
            by_label[entry] = setting
            candidates[entry] = execute(entry, common + _arguments({**run, **setting}) + extra_args, search_seeds,
                                        (teacher_key,), model, test=False,
                                        extra={"search_of": name, "setting": setting})
        best, val_score = select_best(candidates, options["select"])
        chosen = by_label[best]
        extra = {"selected_of": name, "setting": chosen, "selected": label(chosen), "selection_score": val_score,
                 "select": options["select"]}
        args = common + _arguments({**run, **chosen}) + extra_args
        if options["retrain"]:
            execute(f"{name} (selected)", args, seeds, (teacher_key,), model, extra=extra)
        else:
            weights = {r["seed"]: r["student_weights"] for r in candidates[best]}
            execute(f"{name} (selected)", args, sorted(weights), (teacher_key,), model, extra=extra, weights_of=weights)
    return records


def _announce(console: Any, name: str, seed: int, index: int) -> None:
    """A rule naming the run about to start (``index``: how many this sweep has started, 0 for the teacher)."""
    if console is not None:
        from rich.markup import escape

        step = f"run {index} · " if index else ""
        console.rule(f"{step}[bold]{escape(name)}[/bold] · seed {seed}")


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


def table_runs(spec: dict[str, Any]) -> list[str]:
    """The table's rows for an experiment ``spec``: the teacher, then each run (``<run> (selected)`` for a
    searched run)."""
    options = _search_options(spec)
    return ["teacher", *(f"{name} (selected)" if expand({**spec.get("defaults", {}), **run}, options["samples"],
                                                      options["seed"]) else name
                         for name, run in spec["runs"].items())]


def search_report(records: list[dict[str, Any]], select: str = "last") -> str:
    """Per searched run: the setting chosen on validation and its validation score, then its test score, then how
    the validation score moves with each searched argument. Empty when nothing was searched."""
    sections = []
    for name in dict.fromkeys(r["search_of"] for r in records if "search_of" in r):
        candidates: dict[str, list[dict[str, Any]]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for r in latest_records(records, [x["run"] for x in records if x.get("search_of") == name]).values():
            candidates[r[0]["run"]], settings[r[0]["run"]] = r, r[0]["setting"]
        selected = latest_records(records, [f"{name} (selected)"]).get(f"{name} (selected)", [])
        lines = [f"### {name}", ""]
        if selected:
            test = [r["test/acc"] for r in selected if "test/acc" in r]
            lines.append(f"chosen on validation ({select} epoch, {len(next(iter(candidates.values())))} seed(s) per "
                         f"setting): **{selected[0]['selected']}**, validation top-1 "
                         f"{100 * selected[0]['selection_score']:.2f}; then test top-1 {_cell(test, True)} "
                         f"over {len(test)} seed(s)")
            lines.append("")
        lines += ["| argument | value | mean validation top-1 (%) | runs |", "|---|---|---:|---:|"]
        for argument, value, mean, count in sensitivity_rows(candidates, settings, select):
            lines.append(f"| {argument} | {value} | {100 * mean:.2f} | {count} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def plot_sensitivity(records: list[dict[str, Any]], path: str | Path, select: str = "last") -> bool:
    """One panel per (searched run, argument): mean validation top-1 against the argument's value. Returns whether
    there was anything to plot."""
    panels = []
    for name in dict.fromkeys(r["search_of"] for r in records if "search_of" in r):
        grouped = latest_records(records, [x["run"] for x in records if x.get("search_of") == name])
        settings = {run: rows[0]["setting"] for run, rows in grouped.items()}
        rows = sensitivity_rows(grouped, settings, select)
        for argument in dict.fromkeys(row[0] for row in rows):
            panels.append((name, argument, [(v, m) for a, v, m, _ in rows if a == argument]))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, argument, points) in zip(axes[0], panels):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in points)
        xs = [v for v, _ in points] if numeric else list(range(len(points)))
        ax.plot(xs, [100 * m for _, m in points], marker="o")
        if not numeric:
            ax.set_xticks(xs, [str(v) for v, _ in points])
        ax.set_xlabel(argument.split(".")[-1])
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(name, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(records: list[dict[str, Any]], run_names: list[str], output_dir: str | Path, select: str = "last") -> str:
    """Write ``results.md`` (the table, then the search report when something was searched), ``results.png`` and,
    after a search, ``sensitivity.png`` to ``output_dir``; return the markdown."""
    text = results_table(records, run_names)
    searched = search_report(records, select)
    if searched:
        text += "\n\n## Hyper-parameter search\n\n" + searched
        plot_sensitivity(records, Path(output_dir, "sensitivity.png"), select)
    Path(output_dir, "results.md").write_text(text + "\n")
    plot_results(records, run_names, Path(output_dir, "results.png"))
    return text


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
    table = report(records, table_runs(spec), output_dir, _search_options(spec)["select"])
    print()
    print(table)
    print(f"\nrecords: {output_dir / 'results.jsonl'}; table and plot: {output_dir / 'results.md'}, "
          f"{output_dir / 'results.png'}")
