"""The lightning-kd command: LightningCLI subcommands, config printing, experiment files, export, DDP."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main
from lightning_kd.runner import results_table, run_experiment

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--config", str(ROOT / "configs/data/digits.yaml"), "--config", str(ROOT / "configs/trainer/cpu_quick.yaml")]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])


def test_fit_by_method_name_links_classes_and_channels(tmp_path):
    weights = tmp_path / "teacher.pt"
    from lightning_kd.models import create_model

    torch.save(create_model("cnn_small", num_classes=10, in_chans=1).state_dict(), weights)
    main(["fit", *DIGITS, *QUICK, "--model", "DKD", "--model.student", "cnn_tiny", "--model.teacher", "cnn_small",
          "--model.teacher_weights", str(weights), "--model.beta", "2.0", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["in_chans"] == 1 and hparams["beta"] == 2.0
    assert hparams["teacher_weights"] == str(weights)


def test_print_config_shows_method_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *DIGITS, "--model", "KD", "--model.student", "cnn_tiny", "--model.teacher", "cnn_small",
              "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    init_args = config["model"]["init_args"]
    assert config["model"]["class_path"] == "lightning_kd.methods.KD"
    assert (init_args["temperature"], init_args["ce_weight"], init_args["kd_weight"]) == (4.0, 0.1, 0.9)
    assert config["data"]["class_path"] == "lightning_kd.data.DigitsDataModule"


def test_checkpoint_alone_rebuilds_the_model_for_test_and_export(tmp_path, digits):
    from lightning_kd.models import create_model

    torch.manual_seed(0)
    teacher = create_model("cnn_small", num_classes=10, in_chans=1)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    main(["fit", *DIGITS, *QUICK, "--model", "KD", "--model.student", "cnn_tiny", "--model.teacher", "cnn_small",
          "--model.teacher_weights", str(tmp_path / "teacher.pth"), "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    cli = main(["test", *DIGITS, "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    digits.setup()
    images, targets = digits.datasets["test"].tensors
    with torch.no_grad():
        teacher_acc = (teacher.eval()(images).argmax(1) == targets).float().mean().item()
    assert cli.trainer.callback_metrics["test/teacher_acc"].item() == pytest.approx(teacher_acc, abs=1e-6)

    main(["export", str(checkpoint), str(tmp_path / "student.pt")])
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    student = create_model("cnn_tiny", num_classes=10, in_chans=1)
    student.load_state_dict(state)
    with torch.no_grad():
        student_acc = (student.eval()(images).argmax(1) == targets).float().mean().item()
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(student_acc, abs=1e-6)
    with pytest.raises(ValueError, match="holds no 'student"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "other.ckpt")
        main(["export", str(tmp_path / "other.ckpt"), str(tmp_path / "x.pt")])


def test_python_dash_m_and_help_list_the_commands():
    result = subprocess.run([sys.executable, "-m", "lightning_kd", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("fit", "validate", "test", "predict", "lightning-kd run", "lightning-kd export"):
        assert word in result.stdout


def test_experiment_runner_trains_teacher_once_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    experiment = {
        "output_dir": str(tmp_path / "out"),
        "config": ["configs/data/digits.yaml", "configs/trainer/cpu_quick.yaml"],
        "seeds": [0, 1],
        "defaults": {"model.student": "cnn_tiny", "trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
                     "trainer.enable_progress_bar": False},
        "teacher": {"model": "Supervised", "model.student": "cnn_small", "trainer.max_epochs": 1,
                    "trainer.limit_train_batches": 2, "trainer.enable_progress_bar": False},
        "runs": {"student alone": {"model": "Supervised"}, "KD": {"model": "KD", "model.temperature": 2.0}},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    records = run_experiment(path)
    assert [(r["run"], r["seed"]) for r in records] == [("teacher", 0), ("student alone", 0), ("student alone", 1),
                                                          ("KD", 0), ("KD", 1)]
    assert all(0 <= r["test/acc"] <= 1 for r in records)
    assert all("test/agreement" in r for r in records if r["run"] != "teacher")
    teacher_files = list((tmp_path / "out").glob("teacher-*.pt"))
    assert len(teacher_files) == 1
    stamp = teacher_files[0].stat().st_mtime_ns

    again = run_experiment(path)
    assert len(again) == len(records) and teacher_files[0].stat().st_mtime_ns == stamp
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5

    experiment["runs"]["KD"]["model.temperature"] = 3.0
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    assert len(run_experiment(path)) == 7, "changed arguments must rerun that run (both seeds) only"

    table = results_table(again, ["teacher", "student alone", "KD"])
    assert table.splitlines()[0] == "| run | model | top-1 (%) | agreement (%) | seeds |"
    kd_row = next(line for line in table.splitlines() if line.startswith("| KD |"))
    values = [100 * r["test/acc"] for r in again if r["run"] == "KD"]
    mean = sum(values) / 2
    assert f"{mean:.2f} ± " in kd_row and kd_row.endswith("| 2 |")


def test_results_table_by_hand():
    records = [{"run": "KD", "seed": 0, "model": "m", "test/acc": 0.5, "test/agreement": 0.75},
               {"run": "KD", "seed": 1, "model": "m", "test/acc": 0.7, "test/agreement": 0.25}]
    table = results_table(records, ["KD"])
    # mean 60.00, sample std sqrt(((50-60)^2 + (70-60)^2) / 1) = 14.14; agreement 50.00 ± 35.36
    assert table.splitlines()[2] == "| KD | m | 60.00 ± 14.14 | 50.00 ± 35.36 | 2 |"


@pytest.mark.ddp
def test_two_process_ddp_on_cpu_trains_and_logs(tmp_path):
    command = [sys.executable, "-m", "lightning_kd", "fit", *DIGITS, "--model", "KD", "--model.student", "cnn_tiny",
               "--model.teacher", "cnn_small", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
               "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    val = [r for r in rows if r.get("val/acc")]
    train = [r for r in rows if r.get("train/loss_kd")]
    assert len(val) == 2, "one validation row per epoch, written by rank 0 only"
    # 1348 training images / (2 processes x batch 64) = 11 steps per epoch
    assert len(train) == 22 and int(train[-1]["step"]) == 21
    assert all(0 <= float(r["val/agreement"]) <= 1 for r in val)
