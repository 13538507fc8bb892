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
unless they set ``model.teacher`` themselves (``model.student`` may be a mapping, e.g. a small causal LM's config). Every finished (run, seed) is appended to ``results.jsonl`` with
its resolved config, and is not run again while its arguments and config files are unchanged, so an
interrupted sweep resumes where it stopped (``--overwrite`` reruns everything).

The table's columns are ``columns:`` (a mapping ``metric: header``; default test top-1, best validation top-1,
agreement and time): any test metric (``test/bpb``), ``best_val_<name>`` for a validation metric (the lowest for
losses, ``bpb`` and ``ppl``, else the highest) and ``wall_time_s``. A search selects on ``search.metric`` (see
:mod:`lightning_kd.search`), e.g. ``search: {metric: val/bpb}`` for language models.

Reliability: a fit stopped by SIGINT/SIGTERM (or a crash) leaves a checkpoint in the run's folder (``last.ckpt``
after every epoch, ``interrupted.ckpt`` at the batch where it stopped, random number generator states included) and
the next ``lightning-kd run`` continues that (run, seed) from it, to the same final weights. Several processes may
share one ``output_dir``: a (run, seed) is claimed with a lock file before it runs and ``results.jsonl`` is appended
under a lock, so none runs twice and no line is interleaved; a line cut short by a crash is skipped with a warning.
"""


from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback

from lightning_kd.models.weights import load_checkpoint
from lightning_kd.report import (COLUMNS, PERCENT, latest_records, mean_std, plot_results,  # noqa: F401  (API)
                                 plot_sensitivity, report, results_table, search_report, table_runs)
from lightning_kd.search import (SEARCH_DEFAULTS, curve_key, expand, label, lower_is_better,  # noqa: F401
                                 search_options, select_best)

EXPERIMENT_KEYS = ("output_dir", "config", "common", "seeds", "defaults", "teacher", "runs", "search", "columns")
RESUME_FILES = ("interrupted.ckpt", "last.ckpt")


class ValidationHistory(Callback):
    """Collects ``val/acc`` (``accuracies``) and every other scalar ``val/*`` metric (``curves`` by name) after every
    validation (sanity checks excluded), and the optimizer step it ran at (``steps``); kept in checkpoints so that a
    resumed fit reports the whole curves. Read in ``on_validation_end``, after the module's own
    ``on_validation_epoch_end`` has logged (callbacks' epoch-end hooks run before the module's)."""

    def __init__(self):
        self.accuracies: list[float] = []
        self.curves: dict[str, list[float]] = {}
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.steps.append(int(trainer.global_step))
        if "val/acc" in trainer.callback_metrics:
            self.accuracies.append(float(trainer.callback_metrics["val/acc"]))
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/") and name != "val/acc" and getattr(value, "numel", lambda: 1)() == 1:
                self.curves.setdefault(name, []).append(float(value))

    def state_dict(self) -> dict[str, Any]:
        return {"accuracies": list(self.accuracies), "curves": {k: list(v) for k, v in self.curves.items()},
                "steps": list(self.steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracies = list(state_dict.get("accuracies", []))
        self.curves = {k: list(v) for k, v in state_dict.get("curves", {}).items()}
        self.steps = list(state_dict.get("steps", []))


class ResumeCheckpoints(Callback):
    """Makes a fit resumable from ``directory``: ``last.ckpt`` after every training epoch and ``interrupted.ckpt``
    when SIGINT/SIGTERM (or an error) stops it between batches, each written under a temporary name and then
    renamed (a kill while saving leaves the previous file whole). The checkpoints carry the random number
    generators' states (torch, CUDA, NumPy, Python), restored on resume, so that a resumed fit draws what an
    uninterrupted one would. Every file loads with ``torch.load(weights_only=True)``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _save(self, trainer, name: str) -> None:
        target = self.directory / name
        partial = target.with_name(name + ".partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the whole training state (weights_only: what to save)
        if trainer.is_global_zero:
            os.replace(partial, target)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, "last.ckpt")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.sanity_checking or not trainer.training:
            return  # stopped in validation: last.ckpt (the previous epoch) is the consistent state
        self._save(trainer, "interrupted.ckpt")

    def state_dict(self) -> dict[str, Any]:
        import numpy as np

        kind, keys, position, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached],
                "python": random.getstate()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import numpy as np

        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, position, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))


def resume_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint a stopped fit left in ``directory`` (``None`` when there is none)."""
    found = [directory / name for name in RESUME_FILES if (directory / name).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


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

    # ``args`` are parsed as given (DistillationCLI never reads this process's sys.argv when ``args`` is passed)
    return DistillationCLI(args=[*args, "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)],
                           run=False)


def _check_validation_split(datamodule: Any) -> None:
    val_fraction = getattr(datamodule, "hparams", {}).get("val_fraction", 0)
    if not val_fraction or val_fraction <= 0:
        raise ValueError(f"a search selects on validation data, but {type(datamodule).__name__} validates on its test "
                         "split (val_fraction=0): set data.val_fraction (e.g. 0.1) in the experiment's common arguments "
                         "so that a validation split is carved from the training set")


def fit_and_test(args: list[str], root: Path, seed: int, test: bool = True,
                 resume_dir: Path | None = None) -> tuple[dict[str, Any], Any]:
    """``lightning-kd fit`` with ``args``, then ``test`` on the final weights. Returns the record (test metrics,
    per-epoch validation accuracy, best of it, wall time, resolved config) and the fitted module.

    With ``test=False`` (a search candidate) the data must have a validation split of its own, the test split is
    never read, and the student's final weights are kept in ``root/student.pt``. With ``resume_dir`` the fit
    writes resumable checkpoints there (:class:`ResumeCheckpoints`) and continues from the newest one it finds."""
    start = time.perf_counter()
    cli = _cli(args, root, seed)
    if not test:
        _check_validation_split(cli.datamodule)
    history = ValidationHistory()
    cli.trainer.callbacks.append(history)
    ckpt_path = None
    if resume_dir is not None:
        resume_dir.mkdir(parents=True, exist_ok=True)
        cli.trainer.callbacks.append(ResumeCheckpoints(resume_dir))
        ckpt_path = resume_checkpoint(resume_dir)
        if ckpt_path is not None:
            load_checkpoint(ckpt_path, "the checkpoint of the interrupted fit")  # one clear error if it is damaged
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    record: dict[str, Any] = {}
    if ckpt_path is not None:
        record["resumed_from"] = str(ckpt_path)
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
    for name, curve in history.curves.items():  # e.g. val_bpb and best_val_bpb (the lowest: lower is better)
        record[curve_key(name)] = curve
        record["best_" + curve_key(name)] = min(curve) if lower_is_better(name) else max(curve)
    record["wall_time_s"] = time.perf_counter() - start
    record["config"] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))
    return record, cli.model


def test_weights(args: list[str], root: Path, seed: int, student_weights: str) -> dict[str, Any]:
    """``test`` of the module that ``args`` describe with the student's weights from ``student_weights``."""
    start = time.perf_counter()
    cli = _cli(args, root, seed)
    cli.model.student.load_state_dict(load_checkpoint(student_weights, "student weights"))
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    record: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    record["wall_time_s"] = time.perf_counter() - start
    record["config"] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))
    return record


def _common_arguments(spec: dict[str, Any]) -> list[str]:
    fragments = [arg for fragment in spec.get("config", []) for arg in ("--config", fragment)]
    return fragments + _arguments(spec.get("common", {}))


_search_options = search_options


def _run_specs(spec: dict[str, Any], teacher_weights: str | Path) -> list[tuple[str, dict[str, Any], list[str],
                                                                             list[str]]]:
    """Each run as ``(name, arguments mapping with the defaults, common CLI arguments, teacher CLI arguments)``."""
    common, teacher = _common_arguments(spec), spec["teacher"]
    runs = []
    for name, run in spec["runs"].items():
        run = {**spec.get("defaults", {}), **run}
        teacher_model = teacher["model.student"]  # a name, or a mapping (e.g. a tiny_causal_lm config) as JSON
        teacher_args = [] if run.get("model.teacher") is not None else [
            "--model.teacher", teacher_model if isinstance(teacher_model, str) else json.dumps(teacher_model),
            "--model.teacher_weights", str(teacher_weights)]
        runs.append((name, run, common, teacher_args))
    return runs


def run_arguments(spec: dict[str, Any], teacher_weights: str | Path) -> list[tuple[str, list[str]]]:
    """The CLI arguments of every run of an experiment ``spec``, in order: ``("teacher", args)`` first unless the
    teacher is given as a weights file, then each run (which gets the teacher as ``teacher_weights``); a run with
    searched arguments gives one entry per setting, named ``run [setting]``."""
    options, teacher = search_options(spec), spec["teacher"]
    entries = [] if "weights" in teacher else [("teacher", _common_arguments(spec) + _arguments(teacher))]
    for name, run, common, extra in _run_specs(spec, teacher_weights):
        settings = expand(run, options["samples"], options["seed"])
        for setting in settings or [{}]:
            entry = f"{name} [{label(setting)}]" if setting else name
            entries.append((entry, common + _arguments({**run, **setting}) + extra))
    return entries


# ----------------------------------------------------------------------------------------------- records and claims
def read_records(results_file: Path) -> list[dict[str, Any]]:
    """The records of ``results.jsonl``; a line that is not a whole JSON record (a crash while writing it) is
    skipped with a warning."""
    if not results_file.exists():
        return []
    records = []
    for number, line in enumerate(results_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not {"run", "seed", "fingerprint"} <= set(record):
            warnings.warn(f"{results_file}:{number} is not a whole record (cut short by a crash while writing?): "
                          "skipped; its run will run again", stacklevel=2)
            continue
        records.append(record)
    return records


def append_record(results_file: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``results_file`` under its lock, flushed to disk; a last line left without
    its newline by a crash is closed first, so the new record stays a line of its own."""
    with FileLock(str(results_file) + ".lock"):
        with results_file.open("ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def claim_path(output_dir: Path, name: str, seed: int, key: str) -> Path:
    """The lock file of (``name``, ``seed``, ``key``) in ``output_dir/.claims``."""
    directory = output_dir / ".claims"
    directory.mkdir(exist_ok=True)
    return directory / f"{_slug(name)[:80]}-seed{seed}-{key}.lock"


@contextlib.contextmanager
def claim(output_dir: Path, name: str, seed: int, key: str, wait: bool) -> Iterator[bool]:
    """Hold the lock of (``name``, ``seed``, ``key``) in ``output_dir/.claims`` while the block runs; yields whether
    it was taken (with ``wait=False`` a lock held by another process is not waited for). A process that dies
    releases its locks."""
    lock = FileLock(str(claim_path(output_dir, name, seed, key)))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


class _Executor:
    """Runs (name, args) over seeds unless already recorded, appending each record to ``results.jsonl``. A (run,
    seed) another process is running is left to it and its record read when it is done."""

    def __init__(self, output_dir: Path, records: list[dict[str, Any]], overwrite: bool, console: Any):
        self.output_dir, self.records, self.console = output_dir, records, console
        self.results_file = output_dir / "results.jsonl"
        # with ``overwrite`` the records found at the start do not count as done, those appended since do
        self.ignored = len(records) if overwrite else 0
        self.done = {} if overwrite else {(r["run"], r["seed"], r["fingerprint"]): r for r in records}
        self.count = 0

    def refresh(self) -> None:
        """Take in the records other processes appended since."""
        for record in read_records(self.results_file)[self.ignored:]:
            entry = (record["run"], record["seed"], record["fingerprint"])
            if entry not in self.done:
                self.records.append(record)
                self.done[entry] = record

    def _run_one(self, name: str, args: list[str], seed: int, key: str, model: str, test: bool,
                 extra: dict[str, Any] | None, weights_of: dict[int, str] | None, wait: bool) -> dict | None:
        with claim(self.output_dir, name, seed, key, wait) as taken:
            if not taken:
                return None
            self.refresh()
            if (name, seed, key) in self.done:
                return self.done[(name, seed, key)]
            self.count += 1
            _announce(self.console, name, seed, self.count)
            root = self.output_dir / _slug(name) / f"seed{seed}"
            resume_dir = root / f"resume-{key}"
            if weights_of is not None:
                metrics = test_weights(args, root, seed, weights_of[seed])
            else:
                metrics, _ = fit_and_test(args, root, seed, test=test, resume_dir=resume_dir)
            record = _record(self.results_file, name, seed, key, model, {**(extra or {}), **metrics})
            _remove_resume_files(resume_dir)
            self.records.append(record)
            self.done[(name, seed, key)] = record
            return record

    def __call__(self, name: str, args: list[str], seeds: list[int], key_parts: tuple, model: str,
                 test: bool = True, extra: dict[str, Any] | None = None,
                 weights_of: dict[int, str] | None = None) -> list[dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        busy = []
        for seed in seeds:
            variant = () if test and weights_of is None else (test, weights_of and weights_of.get(seed))
            key = _fingerprint(args, seed, *key_parts, *variant)
            if (name, seed, key) in self.done:
                rows[seed] = self.done[(name, seed, key)]
                continue
            record = self._run_one(name, args, seed, key, model, test, extra, weights_of, wait=False)
            if record is None:
                busy.append((seed, key))
            else:
                rows[seed] = record
        for seed, key in busy:  # another process runs these: wait for it, then take its record (or run it)
            rows[seed] = self._run_one(name, args, seed, key, model, test, extra, weights_of, wait=True)
        return [rows[seed] for seed in seeds]


def _remove_resume_files(directory: Path) -> None:
    for name in RESUME_FILES:
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


# ---------------------------------------------------------------------------------------------- experiment files
def load_experiment(path: str | Path) -> dict[str, Any]:
    """The experiment file at ``path``, checked: a YAML error names its line, an unknown top-level key or a missing
    ``teacher``/``runs`` is an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {str(path)!r} does not exist: pass the path of an experiment YAML "
                                "file, e.g. configs/experiments/digits/quickstart.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML ({where}: {problem}): fix the file there (check the indentation "
                         "and that every 'key: value' is closed)") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must be a mapping with the keys {', '.join(EXPERIMENT_KEYS)}, "
                         f"not a {type(spec).__name__}")
    unknown = [key for key in spec if key not in EXPERIMENT_KEYS]
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; an experiment file has "
                         f"{', '.join(EXPERIMENT_KEYS)} (arguments of the runs go under 'common', 'defaults' or a run)")
    for key in ("teacher", "runs"):
        if not isinstance(spec.get(key), dict):
            raise ValueError(f"{path}: '{key}' must be a mapping of CLI arguments (see lightning_kd.runner)")
    if "model.student" not in spec["teacher"]:
        raise ValueError(f"{path}: the teacher needs 'model.student' (its architecture), e.g. "
                         "{model: Supervised, model.student: cnn_large} or {model.student: cnn_large, weights: t.pt}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, e.g. [0, 1, 2]")
    search_options(spec)
    return spec


def output_directory(spec: dict[str, Any], path: str | Path) -> Path:
    """The experiment's ``output_dir`` (default ``runs/<file stem>``), created and checked to be writable."""
    output_dir = Path(spec.get("output_dir") or Path("runs") / Path(path).stem)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"cannot write to output_dir {str(output_dir)!r} ({error.strerror or error}): set "
                              "output_dir in the experiment file to a folder you can write to") from None
    return output_dir


def run_experiment(path: str | Path, overwrite: bool = False, console: Any = None) -> list[dict[str, Any]]:
    """Run every (run, seed) of the experiment file at ``path`` that is not recorded yet; return all records.

    A run with searched arguments (see :mod:`lightning_kd.search`) first fits every setting on ``search.seeds``
    (default: the experiment's seeds) and scores it on the validation split only; the best setting by mean
    validation top-1 (``search.select``: ``last`` or ``best`` epoch) is then tested, as ``<run> (selected)``:
    trained again on every seed when ``search.retrain`` (the default), else the candidates' own weights."""
    spec = load_experiment(path)
    output_dir = output_directory(spec, path)
    seeds, options = spec.get("seeds", [0]), search_options(spec)
    results_file = output_dir / "results.jsonl"
    records = read_records(results_file)
    execute = _Executor(output_dir, records, overwrite, console)

    teacher_spec = spec["teacher"]
    teacher_model = teacher_spec["model.student"]
    if "weights" in teacher_spec:
        teacher_weights, teacher_key = Path(teacher_spec["weights"]), _fingerprint(teacher_spec)
        load_checkpoint(teacher_weights, "the teacher's weights")  # a missing, unsafe or damaged file stops here
    else:
        teacher_args = _common_arguments(spec) + _arguments(teacher_spec)
        teacher_key = _fingerprint(teacher_args, seeds[0])
        teacher_weights = output_dir / f"teacher-{teacher_key}.pt"
        with claim(output_dir, "teacher", seeds[0], teacher_key, wait=True):
            execute.refresh()
            if not teacher_weights.exists() or ("teacher", seeds[0], teacher_key) not in execute.done:
                _announce(console, "teacher", seeds[0], 0)
                resume_dir = output_dir / "teacher" / f"resume-{teacher_key}"
                record, module = fit_and_test(teacher_args, output_dir / "teacher", seeds[0], resume_dir=resume_dir)
                partial = teacher_weights.with_name(teacher_weights.name + ".partial")
                module.export_student(partial)
                os.replace(partial, teacher_weights)
                record = _record(results_file, "teacher", seeds[0], teacher_key, teacher_model, record)
                records.append(record)
                execute.done[("teacher", seeds[0], teacher_key)] = record
                _remove_resume_files(resume_dir)

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
        best, val_score = select_best(candidates, options["select"], options["metric"], options["mode"])
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


def _model_name(model: Any) -> str:
    """A model as the table shows it: its name, or a config mapping as ``key=value`` pairs (its seed left out)."""
    if isinstance(model, dict):
        return " ".join(f"{k.replace('_size', '')}={v}" for k, v in model.items() if k not in ("seed", "vocab_size"))
    return str(model)


def _record(results_file: Path, name: str, seed: int, key: str, model: Any, metrics: dict[str, Any]) -> dict:
    record = {"run": name, "seed": seed, "fingerprint": key, "model": _model_name(model), **metrics}
    append_record(results_file, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-kd run", description=run_experiment.__doc__)
    parser.add_argument("experiment", help="an experiment YAML file, e.g. configs/experiments/digits/quickstart.yaml")
    parser.add_argument("--overwrite", action="store_true", help="rerun runs that are already recorded")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the `lightning-kd fit` arguments of the teacher and of every run (one line per "
                             "searched setting) and run nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        spec = load_experiment(args.experiment)
        teacher = spec["teacher"]
        weights = teacher.get("weights") or output_directory(spec, args.experiment) / "teacher-{}.pt".format(
            _fingerprint(_common_arguments(spec) + _arguments(teacher), spec.get("seeds", [0])[0]))
        print(f"# seeds {spec.get('seeds', [0])}: each run is fitted once per seed (--seed_everything <seed>)")
        for entry, arguments in run_arguments(spec, weights):
            print(f"{entry}: lightning-kd fit {shlex.join(arguments)}")
        return
    from rich.console import Console

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    console = Console()
    try:
        records = run_experiment(args.experiment, overwrite=args.overwrite, console=console)
    except SIGTERMException:
        print("\nstopped by SIGTERM; the fit's checkpoint is kept: rerun the same command to resume", file=sys.stderr)
        sys.exit(143)
    spec = load_experiment(args.experiment)
    output_dir = output_directory(spec, args.experiment)
    options = search_options(spec)
    table = report(records, table_runs(spec), output_dir, options["select"], columns=spec.get("columns"),
                   metric=options["metric"], mode=options["mode"])
    print()
    print(table)
    print(f"\nrecords: {output_dir / 'results.jsonl'}; table and plot: {output_dir / 'results.md'}, "
          f"{output_dir / 'results.png'}")
