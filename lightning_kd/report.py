"""Reports of experiment files: the markdown table of records (mean ± sample std over seeds), the plot of accuracy
per run and per epoch, and the hyper-parameter search's report and sensitivity plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_kd.search import expand, lower_is_better, search_options, sensitivity_rows

COLUMNS = {
    "test/acc": "top-1 last (%)",
    "best_val_acc": "top-1 best epoch (%)",
    "test/agreement": "agreement (%)",
    "wall_time_s": "time (s)",
}
PERCENT = {"test/acc", "best_val_acc", "test/agreement"}


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


def _cell(values: list[float], percent: bool, digits: int | None = None) -> str:
    if not values:
        return "—"
    scale, digits = (100, 2) if percent else (1, 0 if digits is None else digits)
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(records: list[dict[str, Any]], run_names: list[str], columns: dict[str, str] | None = None) -> str:
    """A markdown table, one row per run in ``run_names`` order: model, mean (± sample std over seeds) of each
    column's metric and the number of seeds. ``columns`` (``metric: header``; default :data:`COLUMNS`: test top-1
    at the last epoch, the best epoch's validation top-1, the agreement with the teacher, the wall time): metrics in
    :data:`PERCENT` are shown in percent, ``wall_time_s`` in whole seconds, others with 3 decimals."""
    columns = COLUMNS if columns is None else columns
    lines = ["| run | model | " + " | ".join(columns.values()) + " | seeds |",
             "|---|---|" + "---:|" * (len(columns) + 1)]
    for name, rows in latest_records(records, run_names).items():
        cells = [_cell([r[k] for r in rows if k in r], k in PERCENT, 0 if k == "wall_time_s" else 3) for k in columns]
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
    options = search_options(spec)
    return ["teacher", *(f"{name} (selected)" if expand({**spec.get("defaults", {}), **run}, options["samples"],
                                                      options["seed"]) else name
                         for name, run in spec["runs"].items())]


def search_report(records: list[dict[str, Any]], select: str = "last", metric: str = "val/acc",
                  mode: str | None = None) -> str:
    """Per searched run: the setting chosen on validation (by ``metric``) and its validation score, then its test
    score (the same metric on the test split), then how the validation score moves with each searched argument.
    Empty when nothing was searched."""
    percent = metric == "val/acc"
    shown = "top-1" if percent else metric.split("/", 1)[1]
    best = "lowest" if (mode or ("min" if lower_is_better(metric) else "max")) == "min" else "highest"

    def value(v: float) -> str:
        return f"{100 * v:.2f}" if percent else f"{v:.3f}"

    sections = []
    for name in dict.fromkeys(r["search_of"] for r in records if "search_of" in r):
        candidates: dict[str, list[dict[str, Any]]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for r in latest_records(records, [x["run"] for x in records if x.get("search_of") == name]).values():
            candidates[r[0]["run"]], settings[r[0]["run"]] = r, r[0]["setting"]
        selected = latest_records(records, [f"{name} (selected)"]).get(f"{name} (selected)", [])
        lines = [f"### {name}", ""]
        if selected:
            test_metric = "test/" + metric.split("/", 1)[1]
            test = [r[test_metric] for r in selected if test_metric in r]
            lines.append(f"chosen on validation ({select} epoch, {best} mean, "
                         f"{len(next(iter(candidates.values())))} seed(s) per setting): **{selected[0]['selected']}**, "
                         f"validation {shown} {value(selected[0]['selection_score'])}; then test {shown} "
                         f"{_cell(test, percent, 3)} over {len(test)} seed(s)")
            lines.append("")
        lines += [f"| argument | value | mean validation {shown}{' (%)' if percent else ''} | runs |",
                  "|---|---|---:|---:|"]
        for argument, setting_value, mean, count in sensitivity_rows(candidates, settings, select, metric, mode):
            lines.append(f"| {argument} | {setting_value} | {value(mean)} | {count} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def plot_sensitivity(records: list[dict[str, Any]], path: str | Path, select: str = "last", metric: str = "val/acc",
                     mode: str | None = None) -> bool:
    """One panel per (searched run, argument): mean validation ``metric`` against the argument's value. Returns
    whether there was anything to plot."""
    panels = []
    for name in dict.fromkeys(r["search_of"] for r in records if "search_of" in r):
        grouped = latest_records(records, [x["run"] for x in records if x.get("search_of") == name])
        settings = {run: rows[0]["setting"] for run, rows in grouped.items()}
        rows = sensitivity_rows(grouped, settings, select, metric, mode)
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
        scale = 100 if metric == "val/acc" else 1
        ax.plot(xs, [scale * m for _, m in points], marker="o")
        if not numeric:
            ax.set_xticks(xs, [str(v) for v, _ in points])
        ax.set_xlabel(argument.split(".")[-1])
        ax.set_ylabel("validation top-1 (%)" if metric == "val/acc" else f"validation {metric.split('/', 1)[1]}")
        ax.set_title(name, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(records: list[dict[str, Any]], run_names: list[str], output_dir: str | Path, select: str = "last",
           columns: dict[str, str] | None = None, metric: str = "val/acc", mode: str | None = None) -> str:
    """Write ``results.md`` (the table with ``columns``, then the search report by ``metric`` when something was
    searched), ``results.png`` and, after a search, ``sensitivity.png`` to ``output_dir``; return the markdown."""
    text = results_table(records, run_names, columns)
    searched = search_report(records, select, metric, mode)
    if searched:
        text += "\n\n## Hyper-parameter search\n\n" + searched
        plot_sensitivity(records, Path(output_dir, "sensitivity.png"), select, metric, mode)
    Path(output_dir, "results.md").write_text(text + "\n")
    plot_results(records, run_names, Path(output_dir, "results.png"))
    return text
