"""Hyper-parameter search: grid and random expansion, selection on validation only, resume, reports."""

import math
import sys
from pathlib import Path

import pytest
import yaml

from lightning_kd import runner
from lightning_kd.data import DigitsDataModule
from lightning_kd.runner import report, run_experiment, table_runs
from lightning_kd.search import expand, label, select_best, sensitivity_rows

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"trainer.max_epochs": 2, "trainer.limit_train_batches": 3, "trainer.enable_progress_bar": False}


def test_grid_is_the_cartesian_product_in_order():
    settings = expand({"model": "KD", "model.temperature": {"grid": [1, 4]}, "model.kd_weight": {"grid": [0.1, 0.9]}})
    assert settings == [{"model.temperature": 1, "model.kd_weight": 0.1}, {"model.temperature": 1, "model.kd_weight": 0.9},
                        {"model.temperature": 4, "model.kd_weight": 0.1}, {"model.temperature": 4, "model.kd_weight": 0.9}]
    assert expand({"model": "KD", "model.temperature": 4}) == []


def test_range_includes_its_stop_and_keeps_integers():
    assert expand({"x": {"range": [1, 9, 4]}}) == [{"x": 1}, {"x": 5}, {"x": 9}]
    assert expand({"x": {"range": [0.1, 0.5, 0.2]}}) == [{"x": 0.1}, {"x": 0.3}, {"x": 0.5}]
    with pytest.raises(ValueError, match="step > 0"):
        expand({"x": {"range": [1, 0, 1]}})


def test_random_sampling_is_seeded_and_within_bounds():
    run = {"lr": {"loguniform": [1e-3, 1e-1]}, "t": {"grid": [1, 2, 4]}, "w": {"uniform": [0.0, 1.0]}}
    first, again = expand(run, samples=20, seed=3), expand(run, samples=20, seed=3)
    assert first == again and len(first) == 20 and first != expand(run, samples=20, seed=4)
    assert all(1e-3 <= s["lr"] <= 1e-1 and s["t"] in (1, 2, 4) and 0 <= s["w"] <= 1 for s in first)
    logs = [math.log10(s["lr"]) for s in expand(run, samples=400, seed=0)]
    assert abs(sum(logs) / len(logs) + 2) < 0.15, "log-uniform: the mean exponent is halfway between -3 and -1"
    with pytest.raises(ValueError, match="set search.samples"):
        expand(run)


def test_selection_and_sensitivity_by_hand():
    candidates = {"KD [t=1]": [{"val_acc": [0.5, 0.6]}, {"val_acc": [0.7, 0.8]}],
                  "KD [t=4]": [{"val_acc": [0.9, 0.65]}, {"val_acc": [0.6, 0.65]}]}
    # last epoch: t=1 -> (0.6 + 0.8) / 2 = 0.70, t=4 -> 0.65; best epoch: t=1 -> 0.70, t=4 -> (0.9 + 0.65) / 2 = 0.775
    assert select_best(candidates, "last") == ("KD [t=1]", pytest.approx(0.70))
    assert select_best(candidates, "best") == ("KD [t=4]", pytest.approx(0.775))
    rows = sensitivity_rows(candidates, {"KD [t=1]": {"model.t": 1}, "KD [t=4]": {"model.t": 4}}, "last")
    assert rows == [("model.t", 1, pytest.approx(0.70), 2), ("model.t", 4, pytest.approx(0.65), 2)]
    assert label({"model.temperature": 2, "model.kd_weight": 0.25}) == "temperature=2, kd_weight=0.25"


@pytest.fixture
def search_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])

    def write(val_fraction=0.2, retrain=True):
        spec = {
            "output_dir": str(tmp_path / "out"),
            "common": {"data": "configs/data/digits.yaml", "data.val_fraction": val_fraction,
                       "trainer": "configs/trainer/cpu_quick.yaml", **QUICK},
            "seeds": [0, 1],
            "search": {"seeds": [0], "retrain": retrain},
            "defaults": {"model.student": "cnn_tiny"},
            "teacher": {"model": "Supervised", "model.student": "cnn_small"},
            "runs": {"KD": {"model": "KD", "model.temperature": {"grid": [1.0, 8.0]}}},
        }
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path, spec

    return write


def test_search_selects_on_validation_without_reading_the_test_split(search_experiment, monkeypatch, tmp_path):
    events = []
    real_fit, real_test_loader = runner.fit_and_test, DigitsDataModule.test_dataloader

    def fit(args, root, seed, test=True, **kwargs):
        events.append(("fit", root.parent.name, test))
        return real_fit(args, root, seed, test=test, **kwargs)

    def test_loader(self):
        events.append(("test split read",))
        return real_test_loader(self)

    monkeypatch.setattr(runner, "fit_and_test", fit)
    monkeypatch.setattr(DigitsDataModule, "test_dataloader", test_loader)
    path, spec = search_experiment()
    records = run_experiment(path)

    search_fits = [i for i, e in enumerate(events) if e[0] == "fit" and e[2] is False]
    test_reads = [i for i, e in enumerate(events) if e[0] == "test split read"]
    assert len(search_fits) == 2, "one fit per setting on the single search seed"
    # the teacher is tested before the search; no test read happens from the first search fit to the selection
    assert not [i for i in test_reads if search_fits[0] <= i <= search_fits[-1]]
    assert all(e[2] is False for e in events[search_fits[0]:search_fits[-1] + 1] if e[0] == "fit")

    candidates = {r["run"]: [r] for r in records if r.get("search_of") == "KD"}
    assert set(candidates) == {"KD [temperature=1]", "KD [temperature=8]"}
    assert all("test/acc" not in r[0] for r in candidates.values())
    expected, score = select_best(candidates, "last")
    selected = [r for r in records if r["run"] == "KD (selected)"]
    assert [r["seed"] for r in selected] == [0, 1], "the chosen setting is retrained on every seed"
    assert selected[0]["selected"] == expected.split("[")[1].rstrip("]") and selected[0]["selection_score"] == score
    assert all("test/acc" in r for r in selected)
    temperature = float(expected.split("=")[1].rstrip("]"))
    assert selected[0]["config"]["model"]["init_args"]["temperature"] == temperature

    text = report(records, table_runs(spec), tmp_path / "out")
    assert "| KD (selected) |" in text and "chosen on validation" in text and "| model.temperature | 1.0 |" in text
    assert (tmp_path / "out" / "sensitivity.png").exists()

    events.clear()
    assert len(run_experiment(path)) == len(records) and not [e for e in events if e[0] == "fit"], "resumes: no refit"


def test_search_without_a_validation_split_is_refused(search_experiment):
    path, _ = search_experiment(val_fraction=0.0)
    with pytest.raises(ValueError, match="set data.val_fraction"):
        run_experiment(path)


def test_search_can_test_the_candidates_own_weights(search_experiment, monkeypatch):
    calls = []
    real_fit = runner.fit_and_test
    monkeypatch.setattr(runner, "fit_and_test", lambda *a, **k: calls.append(k.get("test", True)) or real_fit(*a, **k))
    path, _ = search_experiment(retrain=False)
    records = run_experiment(path)
    assert calls == [True, False, False], "teacher, then the two candidates; no retraining"
    selected = [r for r in records if r["run"] == "KD (selected)"]
    assert len(selected) == 1 and "test/acc" in selected[0]
