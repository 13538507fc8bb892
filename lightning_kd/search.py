"""Hyper-parameter search for experiment files: expand searched arguments into settings, pick the best setting on
validation scores, and summarise how the score moves with each argument.

In a run of an experiment file, an argument searched over is a one-key mapping:

* ``{grid: [1, 2, 4]}``: these values;
* ``{range: [start, stop, step]}``: ``start, start + step, ...`` up to ``stop`` included;
* ``{uniform: [low, high]}``, ``{loguniform: [low, high]}``: sampled (needs ``search.samples``).

Every combination (the grid) is a setting, or ``search.samples`` settings drawn at random with ``search.seed``.
A setting is scored by ``search.metric`` on validation (default ``val/acc``, the highest wins; a metric named like a
loss, ``val/loss``, ``val/bpb``, ``val/ppl``, is lowest-wins unless ``search.mode`` says ``max``).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

SEARCH_KINDS = ("grid", "range", "uniform", "loguniform")


def is_searched(value: Any) -> bool:
    """Whether an argument value asks for a search (a one-key mapping ``{grid|range|uniform|loguniform: ...}``)."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SEARCH_KINDS


def _values(key: str, spec: dict[str, Any]) -> list[Any]:
    (kind, arg), = spec.items()
    if kind == "grid":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{key}: grid needs a non-empty list of values, got {arg!r}")
        return list(arg)
    if kind == "range":
        if not isinstance(arg, list) or len(arg) != 3 or arg[2] <= 0 or arg[1] < arg[0]:
            raise ValueError(f"{key}: range needs [start, stop, step] with step > 0 and stop >= start, got {arg!r}")
        start, stop, step = arg
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [start + i * step for i in range(count)]
        return values if all(isinstance(v, int) for v in arg) else [round(v, 10) for v in values]
    raise ValueError(f"{key}: {kind} is sampled, not enumerated: set search.samples to draw settings at random")


def _sample(key: str, spec: dict[str, Any], rng: random.Random) -> Any:
    (kind, arg), = spec.items()
    if kind in ("uniform", "loguniform"):
        if not isinstance(arg, list) or len(arg) != 2 or not arg[0] < arg[1] or (kind == "loguniform" and arg[0] <= 0):
            raise ValueError(f"{key}: {kind} needs [low, high] with low < high (and low > 0 for loguniform)")
        low, high = arg
        if kind == "uniform":
            return rng.uniform(low, high)
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.choice(_values(key, spec))


def expand(run: dict[str, Any], samples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The settings of ``run``'s searched arguments: every combination, or ``samples`` drawn at random. Empty when
    nothing is searched.

    >>> expand({"model": "KD", "model.temperature": {"grid": [2, 4]}, "model.kd_weight": {"range": [0.5, 0.9, 0.4]}})
    [{'model.temperature': 2, 'model.kd_weight': 0.5}, {'model.temperature': 2, 'model.kd_weight': 0.9}, \
{'model.temperature': 4, 'model.kd_weight': 0.5}, {'model.temperature': 4, 'model.kd_weight': 0.9}]
    """
    searched = {key: value for key, value in run.items() if is_searched(value)}
    if not searched:
        return []
    if samples is None:
        grids = [_values(key, spec) for key, spec in searched.items()]
        return [dict(zip(searched, combination)) for combination in itertools.product(*grids)]
    rng = random.Random(seed)
    return [{key: _sample(key, spec, rng) for key, spec in searched.items()} for _ in range(samples)]


def label(setting: dict[str, Any]) -> str:
    """A short name for a setting: ``temperature=2, kd_weight=0.5``."""
    def short(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{key.split('.')[-1]}={short(value)}" for key, value in setting.items())


LOWER_IS_BETTER = ("loss", "bpb", "ppl", "nll")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is better: its last name part is (or ends in) a loss, ``bpb``, ``ppl`` or ``nll``."""
    return metric.rsplit("/", 1)[-1].endswith(LOWER_IS_BETTER)


def curve_key(metric: str) -> str:
    """The record key of a validation metric's curve (one value per validation): ``val/bpb`` -> ``val_bpb``."""
    return metric.replace("/", "_")


def _mode(metric: str, mode: str | None) -> str:
    return mode or ("min" if lower_is_better(metric) else "max")


def score(record: dict[str, Any], select: str = "last", metric: str = "val/acc", mode: str | None = None) -> float:
    """The validation score of one run: ``metric`` after the last validation (``last``) or at its best one
    (``best``: the highest, or the lowest for ``mode="min"``; ``None``: by :func:`lower_is_better`)."""
    if select not in ("last", "best"):
        raise ValueError(f"search.select must be 'last' or 'best', got {select!r}")
    curve = record.get(curve_key(metric)) or []
    if not curve:
        raise ValueError(f"run {record.get('run')!r} (seed {record.get('seed')}) has no {metric} to select on: "
                         "set search.metric to a metric the module logs in validation")
    if select == "last":
        return curve[-1]
    return min(curve) if _mode(metric, mode) == "min" else max(curve)


def select_best(candidates: dict[str, list[dict[str, Any]]], select: str = "last", metric: str = "val/acc",
                mode: str | None = None) -> tuple[str, float]:
    """The candidate (by label) with the best mean validation score over its seeds (the highest, or the lowest for
    ``mode="min"``), and that score; ties go to the first candidate."""
    means = {name: sum(score(r, select, metric, mode) for r in rows) / len(rows)
             for name, rows in candidates.items() if rows}
    if not means:
        raise ValueError("no finished search runs to select from")
    best = (min if _mode(metric, mode) == "min" else max)(means, key=means.get)
    return best, means[best]


def sensitivity_rows(candidates: dict[str, list[dict[str, Any]]], settings: dict[str, dict[str, Any]],
                     select: str = "last", metric: str = "val/acc",
                     mode: str | None = None) -> list[tuple[str, Any, float, int]]:
    """For each searched argument and each of its values: the mean validation score of all finished candidate runs
    with that value, and how many runs it averages: ``(argument, value, mean score, runs)``."""
    rows = []
    arguments = list(next(iter(settings.values()))) if settings else []
    for argument in arguments:
        values = sorted({setting[argument] for setting in settings.values()}, key=lambda v: (str(type(v)), v))
        for value in values:
            scores = [score(r, select, metric, mode) for name, setting in settings.items() if setting[argument] == value
                      for r in candidates.get(name, [])]
            if scores:
                rows.append((argument, value, sum(scores) / len(scores), len(scores)))
    return rows


SEARCH_DEFAULTS = {"select": "last", "samples": None, "seed": 0, "seeds": None, "retrain": True, "metric": "val/acc",
                   "mode": None}


def search_options(spec: dict[str, Any]) -> dict[str, Any]:
    """An experiment's ``search:`` options over :data:`SEARCH_DEFAULTS`; an unknown option is an error."""
    options = {**SEARCH_DEFAULTS, **(spec.get("search") or {})}
    unknown = set(options) - set(SEARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown search options {sorted(unknown)}; known: {sorted(SEARCH_DEFAULTS)}")
    if options["select"] not in ("last", "best"):
        raise ValueError(f"search.select={options['select']!r}: use 'last' or 'best'")
    if not (isinstance(options["metric"], str) and options["metric"].startswith("val/")):
        raise ValueError(f"search.metric={options['metric']!r}: name a validation metric, e.g. 'val/acc' or 'val/bpb'")
    if options["mode"] not in (None, "min", "max"):
        raise ValueError(f"search.mode={options['mode']!r}: use 'min', 'max' or leave it out")
    return options
