"""DistillationTerm itself: recorded arguments and specs, the warm-up ramp, the host, unbuilt parts."""

import pytest
import torch

from lightning_kd.methods import Distiller, ModelOutput
from lightning_kd.methods.base import Batch
from lightning_kd.terms import DKDTerm, DistillationTerm, FitNetTerm, KDTerm, term_from_spec


class Scaled(DistillationTerm):
    """A test term: ``{"scaled": factor · mean(student logits)}``."""

    reads_logits = True
    requires_teacher = False

    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def losses(self, batch, student_out, teacher_out):
        return {"scaled": self.factor * student_out.logits.mean()}


class MoreScaled(Scaled):
    def __init__(self, offset: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset


def test_spec_records_every_argument_once_with_defaults():
    spec = MoreScaled(offset=3.0, factor=5.0, weight=0.5).spec()
    assert spec["class_path"] == f"{__name__}.MoreScaled"
    assert spec["init_args"] == {"offset": 3.0, "factor": 5.0, "weight": 0.5}
    assert DKDTerm().spec()["init_args"]["beta"] == 8.0  # defaults are recorded


def test_a_spec_rebuilds_the_same_term_by_full_or_short_class_path():
    term = DKDTerm(beta=2.0, warmup_epochs=3, weight=0.25)
    for spec in (term.spec(), {"class_path": "DKDTerm", "init_args": term.spec()["init_args"]}):
        again = term_from_spec(spec)
        assert type(again) is DKDTerm and again.spec() == term.spec()
        assert (again.beta, again.warmup_epochs, again.weight) == (2.0, 3, 0.25)
    assert term_from_spec(term) is term


def test_the_ramp_counts_epochs_from_one(monkeypatch):
    model = Distiller("cnn_tiny", num_classes=10, in_chans=1, terms={"s": Scaled(warmup_epochs=4), "flat": Scaled()})
    ramps = []
    for epoch in range(6):
        monkeypatch.setattr(Distiller, "current_epoch", property(lambda self, epoch=epoch: epoch))
        ramps.append((model.terms["s"].ramp(), model.terms["flat"].ramp()))
    assert ramps == [(0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]


def test_forward_weighs_the_losses_and_a_detached_term_says_how_to_attach_it():
    model = Distiller("cnn_tiny", num_classes=10, in_chans=1, terms={"s": Scaled(factor=3.0, weight=0.5)})
    logits = torch.randn(4, 10)
    out = model.terms["s"](Batch(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), ModelOutput(logits), None)
    assert out["scaled"].item() == pytest.approx(0.5 * 3.0 * logits.mean().item())
    with pytest.raises(RuntimeError, match="add_term"):
        Scaled().epoch
    with pytest.raises(ValueError, match="warmup_epochs=-1"):
        Scaled(warmup_epochs=-1)


def test_an_unbuilt_term_names_the_fix():
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, terms={"hint": FitNetTerm(hint_layer=1)})
    with pytest.raises(RuntimeError, match="input_shape"):
        model.training_step((torch.randn(2, 1, 8, 8), torch.tensor([0, 1])), 0)


def test_standardize_follows_the_host_unless_the_term_sets_it():
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, standardize=True,
                      terms={"inherit": KDTerm(), "own": KDTerm(standardize=False)})
    assert model.terms["inherit"].standardize is True and model.terms["own"].standardize is False
