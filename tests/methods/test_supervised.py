"""Tests of lightning_kd.methods.supervised (Supervised, the no-teacher baseline)."""

from __future__ import annotations

import torch

from helpers import logits_pair
from lightning_kd.methods import Supervised


def test_supervised_needs_no_teacher_and_smooths_labels():
    model = Supervised(student="mlp", num_classes=10, in_chans=1, label_smoothing=0.1)
    student, _, target = logits_pair()
    expected = torch.nn.functional.cross_entropy(student, target, label_smoothing=0.1)
    assert torch.allclose(model.cross_entropy(student, target), expected)
    assert model.teacher is None
