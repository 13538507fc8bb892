"""Online terms (DML, KDCL): alone on hand-built peer outputs each is its functional loss × weight × ramp, one loss
per peer, the teachers' logits detached; they take the host's standardization, rebuild from their spec and refuse a
host without peers. DML still loads the checkpoint written before its loss became a term."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_kd.losses import kd_loss, standardize_logits
from lightning_kd.losses.online import mean_logit_ensemble, min_logit_ensemble, mutual_learning_losses
from lightning_kd.methods import DML, KDCL, DistillationModule
from lightning_kd.methods.base import Batch
from lightning_kd.methods.dml import PeerOutput
from lightning_kd.models import create_model
from lightning_kd.terms import DMLTerm, KDCLTerm, term_from_spec

LEGACY = Path(__file__).resolve().parents[1] / "methods" / "legacy"


class EpochDML(DML):
    epoch_now = 0

    @property
    def current_epoch(self) -> int:
        return self.epoch_now


def peers(count: int = 3, seed: int = 0, batch: int = 5, classes: int = 10) -> tuple[list[torch.Tensor], Batch]:
    generator = torch.Generator().manual_seed(seed)
    logits = [(3 * torch.randn(batch, classes, generator=generator)).requires_grad_(True) for _ in range(count)]
    target = torch.randint(0, classes, (batch,), generator=generator)
    return logits, Batch(torch.zeros(batch, 1, 8, 8), target)


def host(term, **kwargs) -> EpochDML:
    model = EpochDML(student="cnn_tiny", num_classes=10, in_chans=1, peers=["cnn_tiny", "cnn_tiny"], **kwargs)
    model.add_term("extra", term)
    return model


CASES = {
    "dml": (lambda **kw: DMLTerm(2.0, **kw), "kl_peer",
            lambda z, y: mutual_learning_losses(z, 2.0)),
    "kdcl_min": (lambda **kw: KDCLTerm("min_logit", 3.0, **kw), "kd_peer",
                 lambda z, y: [kd_loss(k, min_logit_ensemble([x.detach() for x in z], y), 3.0) for k in z]),
    "kdcl_mean": (lambda **kw: KDCLTerm("mean_logit", 3.0, **kw), "kd_peer",
                  lambda z, y: [kd_loss(k, mean_logit_ensemble([x.detach() for x in z]), 3.0) for k in z]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_term_is_the_functional_loss_per_peer_times_weight_and_ramp(name):
    make, prefix, functional = CASES[name]
    term = make(weight=1.5, warmup_epochs=4)
    model = host(term)
    logits, batch = peers()
    out = PeerOutput(logits[0], {}, logits)
    expected = functional(logits, batch.target)
    assert all(value > 0 for value in expected)
    for epoch, ramp in ((0, 0.25), (2, 0.75), (7, 1.0)):
        model.epoch_now = epoch
        losses = term(batch, out, None)
        assert list(losses) == [f"{prefix}{k}" for k in range(3)]
        for k in range(3):
            torch.testing.assert_close(losses[f"{prefix}{k}"], 1.5 * ramp * expected[k])
    # each peer's loss trains that peer only: the others are its (detached) teachers
    grads = torch.autograd.grad(losses[f"{prefix}1"], logits, allow_unused=True)
    assert grads[0] is None and grads[2] is None and grads[1].abs().sum() > 0


def test_dml_term_by_hand():
    # two peers at T=1: peer 0 says (1/2, 1/2), peer 1 says (1/4, 3/4):
    # KL(p1 ‖ p0) = 1/4 ln(1/2) + 3/4 ln(3/2); KL(p0 ‖ p1) = 1/2 ln 2 + 1/2 ln(2/3)
    z0, z1 = torch.zeros(1, 2), torch.log(torch.tensor([[1.0, 3.0]]))
    term = DMLTerm(1.0)
    host(term)
    losses = term(None, PeerOutput(z0, {}, [z0, z1]), None)
    assert losses["kl_peer0"].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert losses["kl_peer1"].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


@pytest.mark.parametrize("name", list(CASES))
def test_standardize_is_the_hosts_unless_the_term_sets_its_own(name):
    make, prefix, functional = CASES[name]
    logits, batch = peers(seed=1)
    out = PeerOutput(logits[0], {}, logits)
    standardized = functional([standardize_logits(z) for z in logits], batch.target)
    plain = functional(logits, batch.target)
    for term, expected in ((make(), standardized), (make(standardize=False), plain)):
        host(term, standardize=True)
        losses = term(batch, out, None)
        for k in range(3):
            torch.testing.assert_close(losses[f"{prefix}{k}"], expected[k])


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip_gives_an_equal_term(name):
    term = CASES[name][0](weight=0.5, warmup_epochs=2)
    spec = term.spec()
    rebuilt = term_from_spec(spec)
    assert type(rebuilt) is type(term) and rebuilt.spec() == spec
    hosts = host(term), host(rebuilt)  # noqa: F841  (the terms hold their hosts by weak reference)
    logits, batch = peers(seed=2)
    out = PeerOutput(logits[0], {}, logits)
    assert term(batch, out, None).keys() == rebuilt(batch, out, None).keys()
    for key, value in term(batch, out, None).items():
        torch.testing.assert_close(rebuilt(batch, out, None)[key], value)


def test_methods_are_their_terms():
    dml = DML(student="cnn_tiny", num_classes=10, in_chans=1, kl_weight=0.3, temperature=2.0)
    term = dml.terms["kl"]
    assert isinstance(term, DMLTerm) and (term.temperature, term.weight) == (2.0, 0.3)
    assert term.spec()["init_args"].items() >= {"temperature": 2.0, "weight": 0.3}.items()
    kdcl = KDCL(student="cnn_tiny", num_classes=10, in_chans=1, ensemble="mean_logit", kd_weight=0.7)
    term = kdcl.terms["kd"]
    assert isinstance(term, KDCLTerm) and (term.ensemble, term.temperature, term.weight) == ("mean_logit", 3.0, 0.7)
    assert term.spec()["init_args"].items() >= {"ensemble": "mean_logit", "temperature": 3.0, "weight": 0.7}.items()


def test_bad_input_is_a_clear_error():
    for term in (DMLTerm(), KDCLTerm()):
        with pytest.raises(ValueError, match=f"{type(term).__name__} distils between peers trained together, but "
                                             "DistillationModule trains none"):
            DistillationModule(student="cnn_tiny", teacher="cnn_tiny", num_classes=10, in_chans=1).add_term("t", term)
    with pytest.raises(ValueError, match="unknown ensemble 'max'"):
        KDCLTerm("max")
    term = DMLTerm()
    host(term)
    with pytest.raises(ValueError, match="DMLTerm reads every peer's logits, but the student's output has no "
                                         "peer_logits"):
        term(None, Batch(torch.zeros(1), torch.zeros(1)), None)


def test_dml_loads_the_checkpoint_written_before_its_loss_was_a_term():
    path = LEGACY / "DML.ckpt"
    saved = torch.load(path, weights_only=True)["state_dict"]
    model = DML.load_from_checkpoint(path)
    assert set(model.state_dict()) == set(saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert (model.num_peers, model.hparams.kl_weight, model.hparams.temperature) == (2, 1.0, 1.0)
    # the peers compute what models given the checkpoint's weights directly compute
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.eval()
    for index, prefix in ((0, "student."), (1, "peers.0.")):
        reference = create_model("cnn_tiny", num_classes=10, in_chans=1).eval()
        reference.load_state_dict({k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)})
        with torch.no_grad():
            torch.testing.assert_close(model.peer(index)(x), reference(x))
    logits, batch = [model.peer(i)(x) for i in range(2)], Batch(x, torch.arange(4))
    losses = model.distillation_losses(batch, PeerOutput(logits[0], {}, logits), None)
    torch.testing.assert_close(losses["kl_peer1"], kd_loss(logits[1], logits[0].detach(), 1.0))
