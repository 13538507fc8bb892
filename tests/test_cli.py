"""The lightning-kd command: LightningCLI subcommands, config printing, experiment files, export, DDP."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--data", str(ROOT / "configs/data/digits.yaml"), "--trainer", str(ROOT / "configs/trainer/cpu_quick.yaml")]
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


@pytest.mark.ddp
def test_two_process_ddp_on_cpu_trains_and_logs(tmp_path):
    """Through the installed console script, which must exit with status 0."""
    command = [str(Path(sys.executable).with_name("lightning-kd")), "fit", *DIGITS, "--model", "KD", "--model.student", "cnn_tiny",
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


def test_export_takes_the_best_peer_of_an_online_checkpoint(tmp_path):
    """Through the module the checkpoint names (its own export_student), for peers of different sizes."""
    main(["fit", *DIGITS, *QUICK, "--model", "DML", "--model.student", "cnn_tiny", "--model.peers", '["cnn_small", "cnn_tiny"]',
          "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(tmp_path)])
    written = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    state = written["state_dict"]
    for accuracy, prefix in (([0.5, 0.7, 0.6], "peers.0."), ([0.8, 0.7, 0.6], "student."), ([0.5, 0.6, 0.7], "peers.1."),
                             ([float("nan")] * 3, "student.")):
        state["peer_val_acc"] = torch.tensor(accuracy)
        torch.save(written, tmp_path / "online.ckpt")
        main(["export", str(tmp_path / "online.ckpt"), str(tmp_path / "best.pt")])
        exported = torch.load(tmp_path / "best.pt", weights_only=True)
        expected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


def test_export_without_the_module_name_refuses_to_guess_a_peer(tmp_path):
    state = {"student.weight": torch.zeros(2), "peers.0.weight": torch.ones(2), "peer_val_acc": torch.tensor([0.1, 0.9])}
    torch.save({"state_dict": state}, tmp_path / "online.ckpt")
    with pytest.raises(ValueError, match="several peers but not the module"):
        main(["export", str(tmp_path / "online.ckpt"), str(tmp_path / "best.pt")])
