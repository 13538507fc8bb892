"""The experiment runner: teacher caching, records, resume after an interruption, table and plot."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from lightning_kd import runner
from lightning_kd.runner import report, results_table, run_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"trainer.max_epochs": 2, "trainer.limit_train_batches": 2, "trainer.enable_progress_bar": False}


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    spec = {
        "output_dir": str(tmp_path / "out"),
        "common": {"data": "configs/data/digits.yaml", "trainer": "configs/trainer/cpu_quick.yaml", **QUICK},
        "seeds": [0, 1],
        "defaults": {"model.student": "cnn_tiny"},
        "teacher": {"model": "Supervised", "model.student": "cnn_small"},
        "runs": {"student alone": {"model": "Supervised"}, "KD": {"model": "KD", "model.temperature": 2.0}},
    }
    path = tmp_path / "experiment.yaml"

    def write(changes=None):
        if changes:
            spec["runs"]["KD"].update(changes)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write


def test_records_every_run_with_its_config_and_curves(experiment, tmp_path):
    records = run_experiment(experiment())
    assert [(r["run"], r["seed"]) for r in records] == [("teacher", 0), ("student alone", 0), ("student alone", 1),
                                                          ("KD", 0), ("KD", 1)]
    for record in records:
        assert 0 <= record["test/acc"] <= 1 and record["wall_time_s"] > 0
        assert len(record["val_acc"]) == 2 and record["best_val_acc"] == max(record["val_acc"])
    kd = records[3]
    assert kd["config"]["model"]["class_path"] == "lightning_kd.methods.KD"
    assert kd["config"]["model"]["init_args"]["temperature"] == 2.0
    assert kd["config"]["model"]["init_args"]["teacher_weights"].endswith(".pt")
    assert kd["config"]["seed_everything"] == 0 and records[4]["config"]["seed_everything"] == 1
    assert all("test/agreement" in r for r in records if r["run"] != "teacher")
    assert len(list((tmp_path / "out").glob("teacher-*.pt"))) == 1


def test_an_interrupted_sweep_resumes_without_rerunning_finished_runs(experiment, tmp_path, monkeypatch):
    real = runner.fit_and_test
    calls = []

    def interrupted_after_three(args, root, seed, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(root)
        return real(args, root, seed, **kwargs)

    monkeypatch.setattr(runner, "fit_and_test", interrupted_after_three)
    path = experiment()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(path)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines] == ["teacher", "student alone", "student alone"]

    calls.clear()
    monkeypatch.setattr(runner, "fit_and_test", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    records = run_experiment(path)
    assert [p.parent.name for p in calls] == ["kd", "kd"], "only the two unfinished runs may run again"
    assert len(records) == 5

    calls.clear()
    assert len(run_experiment(path)) == 5 and not calls, "a finished sweep runs nothing"
    run_experiment(experiment({"model.temperature": 3.0}))
    assert [p.parent.name for p in calls] == ["kd", "kd"], "changed arguments rerun that run's seeds only"


def test_table_and_plot_from_recorded_rows(tmp_path):
    records = [
        {"run": "KD", "seed": 0, "model": "m", "test/acc": 0.5, "test/agreement": 0.75, "best_val_acc": 0.6,
         "wall_time_s": 10.0, "val_acc": [0.4, 0.6]},
        {"run": "KD", "seed": 1, "model": "m", "test/acc": 0.7, "test/agreement": 0.25, "best_val_acc": 0.8,
         "wall_time_s": 14.0, "val_acc": [0.5, 0.8]},
        {"run": "teacher", "seed": 0, "model": "t", "test/acc": 0.9, "best_val_acc": 0.95, "wall_time_s": 3.0,
         "val_acc": [0.9, 0.95]},
    ]
    table = report(records, ["teacher", "KD"], tmp_path)
    rows = table.splitlines()
    assert rows[0] == "| run | model | top-1 last (%) | top-1 best epoch (%) | agreement (%) | time (s) | seeds |"
    # by hand: test top-1 mean 60.00, sample std sqrt((10^2 + 10^2) / 1) = 14.14; best 70.00 ± 14.14;
    # agreement 50.00 ± 35.36; time 12 ± 3 (rounded to seconds)
    assert rows[2] == "| teacher | t | 90.00 | 95.00 | — | 3 | 1 |"
    assert rows[3] == "| KD | m | 60.00 ± 14.14 | 70.00 ± 14.14 | 50.00 ± 35.36 | 12 ± 3 | 2 |"
    assert (tmp_path / "results.md").read_text().strip() == table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_record_rerun_replaces_the_older_one_in_the_table():
    old = {"run": "KD", "seed": 0, "model": "m", "test/acc": 0.1}
    new = {"run": "KD", "seed": 0, "model": "m", "test/acc": 0.9}
    assert "| KD | m | 90.00 |" in results_table([old, new], ["KD"])


def test_dry_run_prints_the_fit_arguments_of_every_run_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import shlex

    from lightning_kd.runner import main as run_main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    spec = yaml.safe_load(Path("configs/experiments/digits/quickstart.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "out")
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_main([str(tmp_path / "quick.yaml"), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    names = [line.split(": lightning-kd fit ", 1)[0] for line in lines]
    assert names == ["teacher", *spec["runs"]]
    kd = shlex.split(lines[names.index("KD")].split(": lightning-kd fit ", 1)[1])
    assert kd[kd.index("--model") + 1] == "KD" and kd[kd.index("--model.teacher") + 1] == "cnn_large"
    assert kd[kd.index("--model.teacher_weights") + 1].startswith(str(tmp_path / "out" / "teacher-"))
    assert not (tmp_path / "out" / "results.jsonl").exists()
