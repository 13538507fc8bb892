"""DataFreeKD's student term: alone on hand-built outputs it is the L1 or KL discrepancy × weight × ramp, named by its
kind; it rebuilds from its spec, the generator maximizes the same discrepancy, and a further term joins the student's
loss on generated inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import make_trainer
from lightning_kd.data import DigitsDataModule
from lightning_kd.data.synthetic import DataFreeDataModule
from lightning_kd.methods.base import ModelOutput
from lightning_kd.methods.datafree import DataFreeKD
from lightning_kd.terms import ATTerm, DataFreeKDTerm, term_from_spec

TINY = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
            latent_dim=8, generator_width=4)


class EpochDataFree(DataFreeKD):
    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def naive_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    total = 0.0
    for i in range(s.shape[0]):
        p, q = (t[i] / temperature).softmax(0), (s[i] / temperature).softmax(0)
        total += sum(p[c] * (p[c].log() - q[c].log()) for c in range(s.shape[1]))
    return temperature ** 2 * total / s.shape[0]


def outputs(seed: int = 0) -> tuple[ModelOutput, ModelOutput]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(ModelOutput(3 * torch.randn(4, 10, generator=generator, dtype=torch.float64)) for _ in range(2))


@pytest.mark.parametrize("kind", ["l1", "kl"])
def test_term_is_the_discrepancy_times_weight_and_ramp(kind):
    term = DataFreeKDTerm(kind, 2.0, weight=1.5, warmup_epochs=2)
    host = EpochDataFree(**TINY, discrepancy=kind, temperature=2.0)
    host.add_term("extra", term)
    s, t = outputs()
    if kind == "l1":
        naive = sum(abs(s.logits[i, c] - t.logits[i, c]) for i in range(4) for c in range(10)) / 40
    else:
        naive = naive_kl(s.logits, t.logits, 2.0)
    for epoch, ramp in ((0, 0.5), (1, 1.0), (5, 1.0)):
        host.epoch_now = epoch
        losses = term(None, s, t)
        assert set(losses) == {kind}
        torch.testing.assert_close(losses[kind].double(), 1.5 * ramp * naive, rtol=1e-5, atol=1e-7)
    # what the generator maximizes: the same discrepancy, unweighted
    torch.testing.assert_close(host.discrepancy(s.logits, t.logits).double(), naive, rtol=1e-5, atol=1e-7)


def test_l1_discrepancy_by_hand():
    term = DataFreeKDTerm("l1")
    host = DataFreeKD(**TINY)
    host.add_term("extra", term)
    s, t = ModelOutput(torch.tensor([[1.0, -2.0, 0.5]])), ModelOutput(torch.tensor([[0.0, 1.0, 0.5]]))
    assert term(None, s, t)["l1"].item() == pytest.approx((1 + 3 + 0) / 3)


def test_spec_round_trip_and_the_methods_term():
    term = DataFreeKDTerm("kl", 3.0, weight=0.5)
    rebuilt = term_from_spec(term.spec())
    assert type(rebuilt) is DataFreeKDTerm and rebuilt.spec() == term.spec()
    assert (rebuilt.discrepancy_kind, rebuilt.temperature, rebuilt.weight) == ("kl", 3.0, 0.5)
    model = DataFreeKD(**TINY, discrepancy="kl", temperature=2.0)
    assert isinstance(model.terms["discrepancy"], DataFreeKDTerm)
    assert (model.terms["discrepancy"].discrepancy_kind, model.terms["discrepancy"].temperature) == ("kl", 2.0)
    with pytest.raises(ValueError, match="unknown discrepancy='l2': choose one of l1, kl"):
        DataFreeKDTerm("l2")


def test_a_further_term_joins_the_students_loss_on_generated_inputs():
    torch.manual_seed(0)
    model = DataFreeKD(**TINY, student_steps=1)
    model.add_term("at", ATTerm(weight=10.0, student_layers=["stages.1"], teacher_layers=["stages.1"]))
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataFreeDataModule(DigitsDataModule(batch_size=16), batch_size=4, steps_per_epoch=1))
    for name in ("", "_l1", "_at", "_generator"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{name}"]), f"train/loss{name} missing"
    assert trainer.callback_metrics["train/loss_at"] > 0
    assert set(model.student_layers) == {"stages.1"}
