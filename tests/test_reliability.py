"""Reliability and security: no file is unpickled beyond weights, interrupted fits resume to the same weights,
processes sharing an output folder neither collide nor corrupt it, and bad inputs stop with one clear error."""

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.checks import InputChecks, check_batch
from lightning_kd.cli import main
from lightning_kd.data import DigitsDataModule
from lightning_kd.data.base import SplitDataModule
from lightning_kd.methods import KD
from lightning_kd.models import create_model
from lightning_kd.models.weights import CorruptCheckpointError, UnsafeCheckpointError, load_weights
from lightning_kd.runner import append_record, load_experiment, read_records, run_experiment


ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--data", str(ROOT / "configs/data/digits.yaml"), "--trainer", str(ROOT / "configs/trainer/cpu_quick.yaml")]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false"]
COMMAND = str(Path(sys.executable).with_name("lightning-kd"))


def make_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{**dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0), **kwargs})


class TouchesAFile:
    """Unpickling this calls Path.touch(marker): a stand-in for code a malicious file would run."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def write_unsafe(path, marker, weights):
    torch.save({"state_dict": weights, "payload": TouchesAFile(marker)}, path)
    return path


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])


@pytest.fixture
def unsafe(tmp_path):
    """A checkpoint-shaped file whose full unpickling would create ``marker``; the marker must never appear."""
    marker = tmp_path / "marker"
    weights = {f"student.{k}": v for k, v in create_model("cnn_tiny", num_classes=10, in_chans=1).state_dict().items()}
    path = write_unsafe(tmp_path / "unsafe.ckpt", marker, weights)
    yield path
    assert not marker.exists(), "code in the file ran"


# ------------------------------------------------------------------------------------------------------ security
def test_teacher_weights_refuse_code(unsafe):
    with pytest.raises(UnsafeCheckpointError, match="teacher_weights .*could run code.*state_dict"):
        KD(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1, teacher_weights=str(unsafe))


def test_load_weights_refuses_code(unsafe):
    with pytest.raises(UnsafeCheckpointError):
        load_weights(create_model("cnn_tiny", num_classes=10, in_chans=1), unsafe, role="student")


def test_export_refuses_code(unsafe, tmp_path):
    with pytest.raises(UnsafeCheckpointError):
        main(["export", str(unsafe), str(tmp_path / "student.pt")])
    assert not (tmp_path / "student.pt").exists()


@pytest.mark.parametrize("command", ["test", "validate", "fit"])
def test_ckpt_path_refuses_code(unsafe, command):
    with pytest.raises(UnsafeCheckpointError, match="--ckpt_path"):
        main([command, *DIGITS, "--model", "KD", "--model.student", "cnn_tiny", "--model.teacher", "cnn_tiny",
              "--ckpt_path", str(unsafe)])


def test_weights_only_false_is_refused(tmp_path):
    with pytest.raises(ValueError, match="weights_only=True only"):
        main(["test", *DIGITS, "--model", "Supervised", "--model.student", "cnn_tiny", "--weights_only", "false",
              "--trainer.default_root_dir", str(tmp_path)])


def test_load_from_checkpoint_refuses_code(unsafe):
    with pytest.raises(pickle.UnpicklingError):
        KD.load_from_checkpoint(unsafe)


def test_runner_teacher_weights_refuse_code(unsafe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "common": {"data": "configs/data/digits.yaml"},
        "teacher": {"model.student": "cnn_tiny", "weights": str(unsafe)},
        "runs": {"KD": {"model": "KD", "model.student": "cnn_tiny"}}}))
    with pytest.raises(UnsafeCheckpointError, match="the teacher's weights"):
        run_experiment(path)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_safetensors_teacher_through_the_cli(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = create_model("cnn_small", num_classes=10, in_chans=1)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    cli = main(["fit", *DIGITS, *QUICK, "--model", "KD", "--model.student", "cnn_tiny", "--model.teacher", "cnn_small",
                "--model.teacher_weights", str(tmp_path / "teacher.safetensors")])
    assert all(torch.equal(v, cli.model.teacher.state_dict()[k]) for k, v in teacher.state_dict().items())


# ------------------------------------------------------------------------------------------------- interruption
STOPPER = textwrap.dedent("""
    import os
    import signal

    from lightning.pytorch.callbacks import Callback


    class Stop(Callback):
        '''Sends this process SIGTERM after training batch STOP_BATCH of epoch STOP_EPOCH, when STOP is set.'''

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if os.environ.get("STOP") and trainer.current_epoch == int(os.environ["STOP_EPOCH"]) \\
                    and batch_idx == int(os.environ["STOP_BATCH"]):
                os.kill(os.getpid(), signal.SIGTERM)
""")


def _experiment(tmp_path, name):
    spec = {
        "output_dir": str(tmp_path / name),
        "common": {"data": "configs/data/digits.yaml", "trainer": "configs/trainer/cpu_quick.yaml",
                   "trainer.max_epochs": 3, "trainer.limit_train_batches": 5, "trainer.enable_progress_bar": False,
                   "trainer.callbacks": [{"class_path": "stopper.Stop"}]},
        "seeds": [0],
        "teacher": {"model": "Supervised", "model.student": "cnn_small"},
        "runs": {"KD": {"model": "KD", "model.student": "cnn_tiny", "trainer.max_epochs": 1}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(path, tmp_path, **env):
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "STOP_EPOCH": "1", "STOP_BATCH": "2", **env}
    return subprocess.run([COMMAND, "run", str(path)], capture_output=True, text=True, cwd=ROOT, env=environment,
                          timeout=300)


def _stop_at(epoch, batch):
    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if trainer.current_epoch == epoch and batch_idx == batch:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the fit after this batch

    return Stop()


def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """In this process: the runner's fit, stopped by a real SIGTERM, then resumed from what it left."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_kd.runner import fit_and_test

    args = [*DIGITS, "--model", "Supervised", "--model.student", "cnn_small", "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
            "false", "--data.val_fraction", "0.1"]
    record, whole = fit_and_test(args, tmp_path / "whole", 0, test=False, resume_dir=tmp_path / "whole" / "resume")
    resume = tmp_path / "stopped" / "resume"
    original = fit_and_test.__globals__["_cli"]

    def with_stop(*a, **k):
        cli = original(*a, **k)
        cli.trainer.callbacks.append(_stop_at(epoch=1, batch=2))
        return cli

    fit_and_test.__globals__["_cli"] = with_stop
    try:
        with pytest.raises(SIGTERMException):
            fit_and_test(args, tmp_path / "stopped", 0, test=False, resume_dir=resume)
    finally:
        fit_and_test.__globals__["_cli"] = original
    assert torch.load(resume / "interrupted.ckpt", weights_only=True)["global_step"] == 5 + 3
    again, resumed = fit_and_test(args, tmp_path / "stopped", 0, test=False, resume_dir=resume)
    assert again["resumed_from"].endswith("interrupted.ckpt") and again["val_acc"] == record["val_acc"]
    expected, got = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from an uninterrupted run"


def test_sigterm_mid_epoch_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    """The same through the ``lightning-kd run`` command (three processes)."""
    (tmp_path / "stopper.py").write_text(STOPPER)
    reference = _run(_experiment(tmp_path, "whole"), tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    path = _experiment(tmp_path, "stopped")
    stopped = _run(path, tmp_path, STOP="1")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "rerun the same command to resume" in stopped.stderr
    left = list((tmp_path / "stopped" / "teacher").rglob("interrupted.ckpt"))
    assert len(left) == 1 and not (tmp_path / "stopped" / "results.jsonl").exists()
    state = torch.load(left[0], weights_only=True)  # what we write loads without unpickling code
    assert state["global_step"] == 5 + 3, "stopped after the third batch of the second epoch"

    resumed = _run(path, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_records(tmp_path / "stopped" / "results.jsonl")
    assert [r["run"] for r in records] == ["teacher", "KD"] and records[0]["resumed_from"].endswith("interrupted.ckpt")
    assert len(records[0]["val_acc"]) == 3, "the validation curve of the epochs before the stop is kept"
    whole, = (tmp_path / "whole").glob("teacher-*.pt")
    again, = (tmp_path / "stopped").glob("teacher-*.pt")
    assert whole.name == again.name
    expected, got = torch.load(whole, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from an uninterrupted run"
    assert not list((tmp_path / "stopped" / "teacher").rglob("*.ckpt")), "finished runs leave no resume files"


def test_resumable_loader_skips_the_completed_batches_of_the_same_epoch():
    from lightning_kd.data.base import EpochSeededSampler, ResumableDataLoader

    data = TensorDataset(torch.arange(20))
    loader = ResumableDataLoader(data, batch_size=4, sampler=EpochSeededSampler(20, seed=3), progress=lambda: 2)
    loader.sampler.set_epoch(1)
    whole = [b[0].tolist() for b in loader]
    assert loader.state_dict() == {"completed_batches": 2}
    loader.load_state_dict({"completed_batches": 2})
    iterator = iter(loader)
    loader.sampler.set_epoch(1)  # Lightning sets the epoch after creating the iterator
    assert [b[0].tolist() for b in iterator] == whole[2:]
    assert [b[0].tolist() for b in loader] == whole, "the skip applies once"


# ------------------------------------------------------------------------------------------- shared output folder
def _append_many(path, worker):
    for index in range(40):
        append_record(Path(path), {"run": f"w{worker}", "seed": index, "fingerprint": "f", "pad": "x" * 5000})


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    lines = path.read_text().splitlines()
    assert len(lines) == 120 and all(json.loads(line)["pad"] == "x" * 5000 for line in lines)


def test_a_truncated_last_line_is_skipped_with_a_warning_and_closed(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"run": "a", "seed": 0, "fingerprint": "f"}) + "\n" + '{"run": "b", "se')
    with pytest.warns(UserWarning, match=r"results.jsonl:2 is not a whole record"):
        assert [r["run"] for r in read_records(path)] == ["a"]
    append_record(path, {"run": "c", "seed": 0, "fingerprint": "f"})
    with pytest.warns(UserWarning):
        assert [r["run"] for r in read_records(path)] == ["a", "c"]


def test_a_claimed_run_is_left_to_its_process_until_it_dies(tmp_path):
    from lightning_kd.runner import claim, claim_path

    lock = claim_path(tmp_path, "KD", 0, "abc")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire();"
                               " print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with claim(tmp_path, "KD", 0, "abc", wait=False) as taken:
            assert not taken
        with claim(tmp_path, "KD", 1, "abc", wait=False) as taken:
            assert taken, "another seed is free"
    finally:
        holder.kill()
        holder.wait()
    with claim(tmp_path, "KD", 0, "abc", wait=True) as taken:
        assert taken, "a dead process's claim is free"


def test_two_runners_on_one_folder_run_each_seed_once(tmp_path):
    (tmp_path / "stopper.py").write_text(STOPPER)
    spec = yaml.safe_load(_experiment(tmp_path, "shared").read_text())
    spec["seeds"] = [0, 1, 2]
    spec["common"]["trainer.max_epochs"] = 1
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(spec))
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    processes = [subprocess.Popen([COMMAND, "run", str(path)], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    lines = (tmp_path / "shared" / "results.jsonl").read_text().splitlines()
    runs = sorted((json.loads(line)["run"], json.loads(line)["seed"]) for line in lines)
    assert runs == [("KD", 0), ("KD", 1), ("KD", 2), ("teacher", 0)], "every (run, seed) ran exactly once"
    assert all("| KD | cnn_tiny |" in out for out, _ in outputs), "both print the whole table"


# ----------------------------------------------------------------------------------------------------- bad inputs
def test_experiment_file_yaml_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: out\nruns:\n  KD: {model: KD\n  DKD: {model: DKD}\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(line \d+, column \d+"):
        load_experiment(path)


def test_experiment_file_unknown_key_and_missing_parts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model.student": "cnn_tiny"}, "runs": {}, "seed": [0]}))
    with pytest.raises(ValueError, match="unknown key.*'seed'.*seeds"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"teacher": {"model": "Supervised"}, "runs": {}}))
    with pytest.raises(ValueError, match="teacher needs 'model.student'"):
        load_experiment(path)
    with pytest.raises(FileNotFoundError, match="experiment file"):
        load_experiment(tmp_path / "missing.yaml")


def test_unwritable_output_dir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "a_file" / "out"),
                                    "teacher": {"model.student": "cnn_tiny"}, "runs": {}}))
    with pytest.raises(PermissionError, match="cannot write to output_dir .*set output_dir"):
        run_experiment(path)


def test_damaged_resume_checkpoint_is_named(tmp_path):
    from lightning_kd.runner import fit_and_test

    resume = tmp_path / "resume"
    resume.mkdir()
    (resume / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    args = [*DIGITS, *QUICK, "--model", "Supervised", "--model.student", "cnn_tiny"]
    with pytest.raises(CorruptCheckpointError, match="checkpoint of the interrupted fit .*truncated or corrupted"):
        fit_and_test(args, tmp_path, 0, resume_dir=resume)


def test_damaged_checkpoint_for_test_and_export(tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CorruptCheckpointError, match="--ckpt_path"):
        main(["test", *DIGITS, "--ckpt_path", str(tmp_path / "cut.ckpt")])
    with pytest.raises(CorruptCheckpointError):
        main(["export", str(tmp_path / "cut.ckpt"), str(tmp_path / "student.pt")])


@pytest.mark.parametrize("fault, message", [
    ("channels", "3 channels .* in_chans=1"),
    ("nan", "NaN/Inf"),
    ("float labels", "labels are torch.float32"),
    ("integer images", "not floating point"),
    ("label shape", r"labels have shape \(4, 1\)"),
])
def test_bad_batches_get_one_error(fault, message):
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    if fault == "channels":
        images = torch.randn(4, 3, 8, 8)
    elif fault == "nan":
        images[1, 0, 2, 2] = float("nan")
    elif fault == "float labels":
        labels = labels.float()
    elif fault == "integer images":
        images = images.to(torch.uint8)
    else:
        labels = labels[:, None]
    with pytest.raises(ValueError, match=message):
        check_batch(images, labels, 1, "training", 0)
    model = KD(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1)
    trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=[InputChecks()])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))


def test_float_labels_stop_the_module_without_the_callback():
    model = KD(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1)
    loader = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.tensor([0.0, 1.0, 2.0, 3.0])), batch_size=4)
    with pytest.raises(ValueError, match="labels must be class indices"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, loader)


def test_the_cli_checks_batches():
    from lightning_kd.cli import DistillationCLI

    cli = DistillationCLI(args=[*DIGITS, "--model", "Supervised", "--model.student", "cnn_tiny"], run=False)
    assert sum(isinstance(c, InputChecks) for c in cli.trainer.callbacks) == 1


def test_empty_split_is_named():
    class Empty(SplitDataModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"batch_size": 4, "shuffle_seed": 0, "num_workers": 0})
            self.datasets = {"train": TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))}

    with pytest.raises(ValueError, match="the train split of Empty is empty"):
        Empty().train_dataloader()


@pytest.mark.parametrize("fraction", [-0.1, 0.75, 1.0])
def test_val_fraction_outside_its_range_is_named(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=fraction)


def test_teacher_of_the_wrong_architecture_is_named(tmp_path):
    torch.save(create_model("cnn_small", num_classes=10, in_chans=1).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit the teacher"):
        KD(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1, teacher_weights=str(tmp_path / "small.pt"))
