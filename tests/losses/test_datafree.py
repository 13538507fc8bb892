"""Tests for lightning_kd.losses.datafree: each loss against a naive float64 re-computation of the paper's formula
(explicit loops over samples, channels and positions), value and gradient, and against a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_matches_naive, value_and_grad
from lightning_kd.losses.datafree import batch_moments, bn_statistics_loss, logit_l1_discrepancy


def _rand(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift


# --------------------------------------------------------------------------------------- naive references
def naive_l1(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    batch, classes = s.shape
    total = 0.0
    for i in range(batch):
        for c in range(classes):
            total = total + torch.abs(s[i, c] - t[i, c])
    return total / (batch * classes)


def naive_moments(x: torch.Tensor) -> tuple[list, list]:
    """Per-channel mean and biased variance of an (N, C, H, W) or (N, C) batch, one value at a time."""
    values = [[] for _ in range(x.shape[1])]
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            values[c] += list(x[n, c].reshape(-1))
    means = [sum(v) / len(v) for v in values]
    variances = [sum((value - mean) ** 2 for value in v) / len(v) for v, mean in zip(values, means)]
    return means, variances


def naive_bn_prior(inputs, running_means, running_vars) -> torch.Tensor:
    total = 0.0
    for x, running_mean, running_var in zip(inputs, running_means, running_vars):
        means, variances = naive_moments(x)
        total = total + torch.sqrt(sum((m - r) ** 2 for m, r in zip(means, running_mean)))
        total = total + torch.sqrt(sum((v - r) ** 2 for v, r in zip(variances, running_var)))
    return total


# --------------------------------------------------------------------------------------------- L1 logits
@pytest.mark.parametrize("shape", [(2, 3), (5, 7), (8, 100)])
def test_l1_discrepancy_matches_naive(shape):
    teacher = _rand(*shape, seed=1, scale=3.0)
    assert_matches_naive(lambda s: logit_l1_discrepancy(s, teacher.float()), lambda s: naive_l1(s, teacher),
                         _rand(*shape, seed=0, scale=3.0))
    # the generator's gradient flows through both sides: check it through the teacher as well
    student = _rand(*shape, seed=2, scale=3.0)
    assert_matches_naive(lambda t: logit_l1_discrepancy(student.float(), t), lambda t: naive_l1(student, t), teacher)


def test_l1_discrepancy_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0, 5.0], [1.0, -1.0, 0.0]])
    # |1| + 0 + |−2| + |−1| + |1| + 0 = 5 over 6 entries
    assert logit_l1_discrepancy(s, t).item() == pytest.approx(5 / 6)
    # mean over batch and classes: the gradient of each entry is sign(s − t) / (B·C)
    _, grad = value_and_grad(lambda x: logit_l1_discrepancy(x, t), s)
    assert torch.allclose(grad, torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / 6)


def test_l1_discrepancy_is_float32_and_checks_shapes():
    s, t = torch.randn(4, 10, dtype=torch.bfloat16), torch.randn(4, 10, dtype=torch.bfloat16)
    assert logit_l1_discrepancy(s, t).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        logit_l1_discrepancy(torch.randn(4, 10), torch.randn(4, 5))


# ------------------------------------------------------------------------------------------- BN statistics
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 4), (3, 2, 4, 4, 2)])
def test_batch_moments_match_naive(shape):
    x = _rand(*shape, seed=3, scale=2.0, shift=1.0)
    mean, var = batch_moments(x.float())
    naive_mean, naive_var = naive_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), torch.stack(naive_mean), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), torch.stack(naive_var), rtol=1e-5, atol=1e-6)
    # the statistics BatchNorm normalises with in training mode
    bn = torch.nn.BatchNorm2d(shape[1]) if len(shape) == 4 else None
    if bn is not None:
        bn(x.float())
        momentum = bn.momentum
        torch.testing.assert_close(bn.running_mean, momentum * mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [[(4, 3, 5, 5)], [(4, 3, 5, 5), (4, 6, 2, 2), (4, 8)]])
def test_bn_prior_matches_naive(shapes):
    others = [_rand(*shape, seed=10 + i, scale=1.5, shift=0.5) for i, shape in enumerate(shapes[1:])]
    running_means = [_rand(shape[1], seed=20 + i) for i, shape in enumerate(shapes)]
    running_vars = [_rand(shape[1], seed=30 + i).abs() + 0.5 for i, shape in enumerate(shapes)]

    def code(x):
        return bn_statistics_loss([x, *(o.float() for o in others)], [m.float() for m in running_means],
                                  [v.float() for v in running_vars])

    def naive(x):
        return naive_bn_prior([x, *others], running_means, running_vars)

    assert_matches_naive(code, naive, _rand(*shapes[0], seed=4, scale=2.0, shift=1.0))


def test_bn_prior_by_hand():
    # channel 0 holds 1 and 3: mean 2, variance 1; channel 1 holds 0 and 2: mean 1, variance 1
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    running_mean, running_var = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0])
    # ‖(2, 1) − (0, 1)‖ + ‖(1, 1) − (1, 3)‖ = 2 + 2; a second, matching layer adds nothing
    loss = bn_statistics_loss([x, x], [running_mean, torch.tensor([2.0, 1.0])], [running_var, torch.ones(2)])
    assert loss.item() == pytest.approx(4.0)
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0]])  # means (1.5, 2), variances (2.25, 4)
    expected = math.hypot(1.5, 1.0) + math.hypot(1.25, 1.0)
    assert bn_statistics_loss([y], [running_mean], [running_var]).item() == pytest.approx(expected)


def test_bn_prior_is_zero_with_a_finite_gradient_at_the_running_statistics():
    x = _rand(8, 3, 4, 4, seed=5).float()
    mean, var = batch_moments(x)
    loss, grad = value_and_grad(lambda v: bn_statistics_loss([v], [mean], [var]), x)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(grad).all()


def test_bn_prior_checks_its_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="1 BatchNorm inputs but 2 running means"):
        bn_statistics_loss([x], [torch.zeros(3), torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="at least one BatchNorm"):
        bn_statistics_loss([], [], [])
    with pytest.raises(ValueError, match=r"shape \(N, C, ...\)"):
        batch_moments(torch.randn(4))
