"""Language-model distillation end to end: ``lightning-kd fit``/``test`` from YAML on the byte-level pydoc text, the
CI-sized pydoc_bytes experiment through the runner, and selection on a lower-is-better validation metric."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main
from lightning_kd.data import TextDataModule
from lightning_kd.models.hf import tiny_causal_lm
from lightning_kd.report import results_table
from lightning_kd import runner
from lightning_kd.search import lower_is_better, score, select_best

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"hidden_size": 16, "layers": 1, "heads": 2, "seed": 0}
TEACHER = {"hidden_size": 32, "layers": 1, "heads": 2, "seed": 1}
TEXT = ["--data", str(ROOT / "configs/data/text.yaml"), "--data.seq_len", "16", "--data.batch_size", "4",
        "--trainer", str(ROOT / "configs/trainer/cpu_lm.yaml"), "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])


def naive_bits_per_byte(model: torch.nn.Module, blocks: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-byte negative log-likelihood over the blocks' real tokens, in bits, one position at a time in
    float64."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for block in blocks:
            ids, mask = block["input_ids"], block["attention_mask"]
            logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0].double()
            for t in range(ids.shape[0] - 1):
                if mask[t + 1]:
                    row = logits[t]
                    total += float(torch.logsumexp(row, 0) - row[ids[t + 1]])
                    count += 1
    return total / count / math.log(2.0)


def test_text_data_module_gives_its_vocabulary_as_num_classes():
    data = TextDataModule(text="abc" * 20, seq_len=8)
    assert data.num_classes == 256 and data.tokens_per_byte == 1.0


def test_fit_from_yaml_then_test_rebuilds_from_the_checkpoint_alone(tmp_path):
    main(["fit", *TEXT, "--model", "LanguageModelKD", "--model.student", json.dumps(STUDENT),
          "--model.teacher", json.dumps(TEACHER), "--trainer.max_steps", "3",
          "--trainer.val_check_interval", "3", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["num_classes"] == 256
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])  # the teacher comes back from its config

    cli = main(["test", *TEXT, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path)])

    data = TextDataModule(seq_len=16, batch_size=4, val_fraction=0.05, test_fraction=0.05)
    data.setup()
    blocks = [data.datasets["test"][i] for i in range(8)]  # two test batches of four blocks
    student = tiny_causal_lm(**STUDENT)
    student.load_state_dict({k[len("student."):]: v for k, v in saved["state_dict"].items()
                             if k.startswith("student.")})
    metrics = cli.trainer.callback_metrics
    assert metrics["test/bpb"].item() == pytest.approx(naive_bits_per_byte(student, blocks), rel=1e-5)
    assert metrics["test/teacher_bpb"].item() == pytest.approx(naive_bits_per_byte(tiny_causal_lm(**TEACHER), blocks),
                                                               rel=1e-5)


def test_selection_on_bits_per_byte_takes_the_lowest():
    candidates = {"KD [temperature=1]": [{"val_bpb": [3.0, 2.5]}, {"val_bpb": [3.1, 2.7]}],
                  "KD [temperature=2]": [{"val_bpb": [2.9, 2.6]}, {"val_bpb": [2.4, 2.4]}]}
    assert lower_is_better("val/bpb") and lower_is_better("val/loss") and not lower_is_better("val/acc")
    assert select_best(candidates, "last", "val/bpb") == ("KD [temperature=2]", pytest.approx(2.5))
    assert select_best(candidates, "last", "val/bpb", "max") == ("KD [temperature=1]", pytest.approx(2.6))
    assert score({"val_bpb": [3.0, 2.2, 2.5]}, "best", "val/bpb") == 2.2
    with pytest.raises(ValueError, match="has no val/bpb"):
        score({"val_acc": [0.5]}, "last", "val/bpb")


def test_table_shows_the_chosen_columns():
    records = [{"run": "KD", "seed": s, "model": "m", "test/bpb": v, "wall_time_s": 10.0} for s, v in
               enumerate([2.0, 2.5])]
    table = results_table(records, ["KD"], {"test/bpb": "test bits/byte", "wall_time_s": "time (s)"})
    assert table.splitlines()[0] == "| run | model | test bits/byte | time (s) | seeds |"
    assert "| KD | m | 2.250 ± 0.354 | 10 ± 0 | 2 |" in table  # std of (2.0, 2.5) with n-1: 0.3536


def test_ci_sized_pydoc_experiment_runs_and_reports_bits_per_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "configs/experiments/text/pydoc_bytes_ci.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "pydoc_bytes_ci.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))

    runner.main([str(path)])  # what `lightning-kd run` does: every run, then the table
    records = runner.read_records(tmp_path / "out" / "results.jsonl")

    tested = [r for r in records if "test/bpb" in r]
    assert {r["run"] for r in tested} == {"teacher", "student alone", "forward KL (selected)", "reverse KL",
                                          "JSD(0.5)", "TAID"}
    for record in tested:
        assert math.isfinite(record["test/bpb"]) and 0 < record["test/bpb"] < 16
        assert record["best_val_bpb"] == min(record["val_bpb"])
        # validated after steps 2 and 4, each value that validation's own (not the one before it)
        assert len(record["val_bpb"]) == 2 and record["val_bpb"][0] != record["val_bpb"][1]
    candidates = {r["run"]: r["val_bpb"][-1] for r in records if r.get("search_of") == "forward KL"}
    assert len(candidates) == 2
    chosen = next(r for r in records if r["run"] == "forward KL (selected)")
    assert f"forward KL [{chosen['selected']}]" == min(candidates, key=candidates.get)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| run | model | test bits/byte |" in table
    for name in ("teacher", "student alone", "forward KL (selected)", "reverse KL", "JSD(0.5)", "TAID"):
        assert f"| {name} |" in table
