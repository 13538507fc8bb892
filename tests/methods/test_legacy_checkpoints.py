"""Checkpoints written by the methods before their losses became terms (``tests/methods/legacy``, written from
digits with cnn_tiny/cnn_small) still load: every stored tensor lands in the part it was saved from."""

from pathlib import Path

import pytest
import torch

from lightning_kd.data import DigitsDataModule
from lightning_kd.methods import get_method

from conftest import make_trainer

LEGACY = Path(__file__).parent / "legacy"
ROOT = Path(__file__).parents[2]


WRITTEN = ["AT", "CRD", "CTKD", "DKD", "DML", "FitNet", "KD", "ReviewKD", "VID"]


def test_every_legacy_checkpoint_is_there():
    assert sorted(path.stem for path in LEGACY.glob("*.ckpt")) == WRITTEN


@pytest.mark.parametrize("name", WRITTEN)
def test_a_checkpoint_from_before_terms_loads_into_the_same_parts(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the checkpoints name their teacher_weights relative to the repository
    path = LEGACY / f"{name}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    restored = get_method(name).load_from_checkpoint(path)  # strict: every key must find its place
    state = restored.state_dict()
    for key, value in saved["state_dict"].items():
        candidates = [key] if key in state else [k for k in state if k.startswith("terms.") and k.endswith("." + key)]
        assert len(candidates) == 1, f"{name}: {key} has no single place in {sorted(state)}"
        assert torch.equal(state[candidates[0]], value), f"{name}: {key} differs after loading"
    for key, value in saved["hyper_parameters"].items():
        if not key.startswith("_"):
            assert restored.hparams[key] == value, f"{name}: hyper-parameter {key}"
    results = make_trainer(limit_test_batches=2).test(restored, DigitsDataModule(batch_size=64), verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0


def test_load_from_checkpoint_reads_weights_only(monkeypatch):
    monkeypatch.chdir(ROOT)
    seen = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: seen.append(kwargs.get("weights_only")) or load(*args,
                                                                                                              **kwargs))
    get_method("KD").load_from_checkpoint(LEGACY / "KD.ckpt")
    assert seen and all(flag is True for flag in seen)
    with pytest.raises(ValueError, match=r"weights_only=False\) would unpickle"):
        get_method("KD").load_from_checkpoint(LEGACY / "KD.ckpt", weights_only=False)
