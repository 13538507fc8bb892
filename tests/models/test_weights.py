"""Weights files: weights-only loading, safetensors, and one clear error per unreadable file."""

import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lightning_kd.models import create_model
from lightning_kd.models.weights import (CorruptCheckpointError, UnsafeCheckpointError, extract_state_dict,
                                         load_checkpoint, load_weights)


class TouchesAFile:
    """Unpickling this calls Path.touch(marker): a stand-in for code a malicious file would run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_unsafe(path, marker, weights=None):
    torch.save({"state_dict": weights or {"w": torch.zeros(2)}, "payload": TouchesAFile(marker)}, path)
    return path


def test_a_file_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "marker"
    path = write_unsafe(tmp_path / "unsafe.pt", marker)
    # the file really would run code under a full unpickling (checked in a way that cannot touch the marker)
    assert b"touch" in path.read_bytes() or b"Path" in path.read_bytes()
    with pytest.raises(UnsafeCheckpointError, match="weights-only load refuses.*state_dict"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="teacher_weights"):
        load_weights(create_model("cnn_tiny", num_classes=10, in_chans=1), path)
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError) and issubclass(UnsafeCheckpointError, ValueError)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes"])
def test_truncated_or_corrupted_files_get_one_error(tmp_path, damage):
    model = create_model("cnn_tiny", num_classes=10, in_chans=1)
    whole = tmp_path / "whole.pt"
    torch.save(model.state_dict(), whole)
    data = whole.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                        "random bytes": bytes(range(256)) * 4}[damage])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupted"):
        load_weights(model, broken)


def test_safetensors_weights_load_and_a_damaged_one_is_named(tmp_path):
    torch.manual_seed(0)
    source = create_model("cnn_tiny", num_classes=10, in_chans=1)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = create_model("cnn_tiny", num_classes=10, in_chans=1)
    load_weights(target, tmp_path / "w.safetensors")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        load_weights(target, tmp_path / "cut.safetensors")


def test_a_file_holding_no_dict_is_named(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict of weights"):
        load_weights(create_model("cnn_tiny", num_classes=10, in_chans=1), tmp_path / "tensor.pt")


def test_extract_state_dict_strips_wrappers_and_drops_the_teacher():
    w = torch.ones(1)
    checkpoint = {"state_dict": {"student.module.conv.weight": w, "teacher.conv.weight": w}, "epoch": 3}
    assert extract_state_dict(checkpoint) == {"conv.weight": w}
