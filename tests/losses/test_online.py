"""Tests for lightning_kd.losses.online: the mutual-learning KL and the online ensemble teachers, against naive float64
loops over samples and classes (value and gradient) and tiny cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_matches_naive
from lightning_kd.losses.online import dml_loss, mean_logit_ensemble, min_logit_ensemble, mutual_learning_losses

SHAPES = [(2, 3), (5, 7), (8, 10)]


def _rand(b: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _softmax(row, temperature):
    exps = [math.exp(float(v) / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def naive_dml(peer, other, temperature):
    """mean_i T^2 sum_c q_ic log(q_ic / p_ic), p the peer's and q the other peer's softmax(. / T); built from
    scalar tensor ops so that autograd gives the reference gradient w.r.t. the peer."""
    total = 0.0
    for i in range(peer.shape[0]):
        log_norm = torch.logsumexp(peer[i] / temperature, dim=0)
        q = _softmax(other[i], temperature)
        for c in range(peer.shape[1]):
            total = total + q[c] * (math.log(q[c]) - (peer[i, c] / temperature - log_norm))
    return temperature ** 2 * total / peer.shape[0]


# --------------------------------------------------------------------------------------------------------- DML
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dml_loss_matches_naive(shape, temperature):
    peer, other = _rand(*shape, seed=0), _rand(*shape, seed=1)
    assert_matches_naive(lambda x: dml_loss(x, other.float(), temperature),
                         lambda x: naive_dml(x, other, temperature), peer)


def test_dml_loss_by_hand():
    # row 1: peer uniform, other (1/6, 1/6, 2/3): KL = 2/6 ln(1/2) + 2/3 ln 2 = ln(2) / 3
    # row 2: peer (1/4, 1/2, 1/4), other uniform: KL = 1/3 (ln(4/3) + ln(2/3) + ln(4/3)) = ln(32/27) / 3
    peer = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    other = torch.tensor([[0.0, 0.0, math.log(4.0)], [0.0, 0.0, 0.0]])
    expected = (math.log(2.0) / 3 + math.log(32 / 27) / 3) / 2
    assert dml_loss(peer, other).item() == pytest.approx(expected, rel=1e-6)
    # the temperature softens both and multiplies by T^2
    assert dml_loss(peer, other, 2.0).item() == pytest.approx(4 * dml_loss(peer / 2, other / 2).item(), rel=1e-6)
    assert dml_loss(peer, peer).item() == pytest.approx(0.0, abs=1e-7)


def test_dml_loss_treats_the_other_peer_as_a_fixed_target():
    peer, other = _rand(4, 5, seed=0).float().requires_grad_(), _rand(4, 5, seed=1).float().requires_grad_()
    dml_loss(peer, other).backward()
    assert peer.grad.abs().sum() > 0
    assert other.grad is None


@pytest.mark.parametrize("peers", [2, 3, 4])
def test_mutual_learning_losses_are_the_mean_kl_from_the_other_peers(peers):
    logits = [_rand(5, 6, seed=k) for k in range(peers)]
    for k in range(peers):
        others = [logits[j] for j in range(peers) if j != k]

        def code(x, k=k):
            return mutual_learning_losses([x if j == k else z.float() for j, z in enumerate(logits)], 1.0)[k]

        def naive(x):
            return sum(naive_dml(x, other, 1.0) for other in others) / (peers - 1)

        assert_matches_naive(code, naive, logits[k])


def test_mutual_learning_losses_by_hand_and_gradients_only_into_their_own_peer():
    # p1 = (1/2, 1/2), p2 = (1/4, 3/4): L_1 = KL(p2 || p1) = 1/4 ln(1/2) + 3/4 ln(3/2),
    # L_2 = KL(p1 || p2) = 1/2 ln 2 + 1/2 ln(2/3)
    logits = [torch.zeros(1, 2, requires_grad=True), torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)]
    first, second = mutual_learning_losses(logits)
    assert first.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    assert second.item() == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(2 / 3), rel=1e-6)
    for k, term in enumerate((first, second)):
        grads = torch.autograd.grad(term, logits, allow_unused=True, retain_graph=True)
        assert grads[k] is not None and grads[k].abs().sum() > 0
        assert grads[1 - k] is None


def test_mutual_learning_losses_reject_a_lone_peer_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least 2 peers"):
        mutual_learning_losses([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="same shape"):
        mutual_learning_losses([torch.zeros(2, 3), torch.zeros(2, 4)])


# ---------------------------------------------------------------------------------------------- ensembles
def naive_min_logit(logits, target):
    batch, classes = logits[0].shape
    out = torch.empty(batch, classes, dtype=torch.float64)
    for i in range(batch):
        y = int(target[i])
        for c in range(classes):
            out[i, c] = min(float(z[i, c]) - float(z[i, y]) for z in logits)
    return out


@pytest.mark.parametrize("peers", [2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_min_logit_ensemble_matches_naive(shape, peers):
    logits = [_rand(*shape, seed=k) for k in range(peers)]
    target = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(7))
    teacher = min_logit_ensemble([z.float() for z in logits], target)
    assert teacher.dtype == torch.float32
    torch.testing.assert_close(teacher.double(), naive_min_logit(logits, target), rtol=1e-5, atol=1e-5)
    assert torch.all(teacher.gather(1, target[:, None]) == 0)


def test_min_logit_ensemble_by_hand_and_shift_invariance():
    # label 0: peer 1 shifted (0, -1, -2), peer 2 shifted (0, 3, 1) -> class-wise minimum (0, -1, -2)
    # label 2: peer 1 shifted (2, 1, 0), peer 2 shifted (-1, 2, 0) -> (-1, 1, 0)
    first = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    second = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    target = torch.tensor([0, 2])
    expected = torch.tensor([[0.0, -1.0, -2.0], [-1.0, 1.0, 0.0]])
    assert torch.equal(min_logit_ensemble([first, second], target), expected)
    shifted = [first + torch.tensor([[5.0], [-2.0]]), second - 7.0]  # a constant per row changes no prediction
    assert torch.equal(min_logit_ensemble(shifted, target), expected)


@pytest.mark.parametrize("peers", [2, 4])
def test_mean_logit_ensemble_matches_naive_and_by_hand(peers):
    logits = [_rand(3, 5, seed=k) for k in range(peers)]
    naive = torch.tensor([[sum(float(z[i, c]) for z in logits) / peers for c in range(5)] for i in range(3)],
                         dtype=torch.float64)
    torch.testing.assert_close(mean_logit_ensemble([z.float() for z in logits]).double(), naive, rtol=1e-5,
                               atol=1e-6)
    by_hand = mean_logit_ensemble([torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 1.0]])])
    assert torch.equal(by_hand, torch.tensor([[1.0, 2.0, 0.5]]))


def test_ensembles_reject_a_lone_peer():
    with pytest.raises(ValueError, match="at least 2 peers"):
        min_logit_ensemble([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 peers"):
        mean_logit_ensemble([torch.zeros(2, 3)])
