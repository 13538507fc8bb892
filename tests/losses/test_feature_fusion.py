"""Tests for lightning_kd.losses.feature_fusion: OFD's margin and partial L2, ReviewKD's HCL.

Each loss is checked against a naive float64 re-computation written with loops (value and gradient), and on a tiny
input whose value is worked out by hand; the margin against a numerical integration of the Gaussian.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_matches_naive
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin, ofd_margin_from_bn


def _rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------------------ margin
def integrated_negative_mean(mean: float, std: float, points: int = 200_001) -> float:
    """E[x | x < 0] for x ~ N(mean, std²): trapezoidal integration of x·p(x) and p(x) over [mean − 12 std, 0]."""
    x = torch.linspace(min(mean, 0.0) - 12 * std, 0.0, points, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / std) ** 2)
    return (torch.trapezoid(x * density, x) / torch.trapezoid(density, x)).item()


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1.0, 1.0), (-1.0, 0.5), (0.3, 2.0), (2.5, 1.0), (-3.0, 0.2),
                                       (0.5, -1.5)])
def test_margin_is_the_mean_of_the_negative_part(mean, std):
    margin = ofd_margin(torch.tensor([mean]), torch.tensor([std]))
    expected = integrated_negative_mean(mean, abs(std))
    assert margin.dtype == torch.float32 and margin.shape == (1,)
    assert margin.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert margin.item() < 0


def test_margin_agrees_with_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.7, -0.4]), torch.tensor([1.3, 0.8])
    samples = mean + std * torch.randn(400_000, 2, generator=generator, dtype=torch.float64)
    negative = samples < 0
    monte_carlo = (samples * negative).sum(0) / negative.sum(0)
    torch.testing.assert_close(ofd_margin(mean, std).double(), monte_carlo, rtol=0, atol=5e-3)


def test_margin_falls_back_to_minus_three_std_without_negative_responses():
    # Φ(−3.5) ≈ 2.3e-4 is below the official code's 1e-3; Φ(−3) ≈ 1.3e-3 is above it
    margin = ofd_margin(torch.tensor([3.5, 3.0, -2.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert margin[0].item() == pytest.approx(-3.0)
    assert margin[1].item() == pytest.approx(integrated_negative_mean(3.0, 1.0), rel=1e-4)
    assert margin[2].item() == -2.0 and margin[3].item() == 0.0  # σ = 0: the constant when negative, else 0
    assert torch.isfinite(margin).all()


def test_margin_from_batchnorm_uses_beta_and_abs_gamma():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
        bn.running_mean.fill_(5.0)  # the statistics of the BN's input play no part
    expected = [integrated_negative_mean(b, abs(g)) for g, b in ((1.0, 0.0), (-2.0, 1.0), (0.5, -1.0))]
    torch.testing.assert_close(ofd_margin_from_bn(bn).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    plain = ofd_margin_from_bn(nn.BatchNorm2d(2, affine=False))
    torch.testing.assert_close(plain, torch.full((2,), -math.sqrt(2 / math.pi)))
    with pytest.raises(ValueError, match="needs a BatchNorm layer, got Conv2d"):
        ofd_margin_from_bn(nn.Conv2d(2, 2, 1))


# ---------------------------------------------------------------------------------------------------- OFD loss
def naive_ofd(s, t, margin):
    total = 0.0
    batch, channels = s.shape[:2]
    for b in range(batch):
        for c in range(channels):
            for s_value, t_value in zip(s[b, c].reshape(-1), t[b, c].reshape(-1)):
                target = max(t_value, margin[c])
                if s_value > target or target > 0:
                    total = total + (s_value - target) ** 2
    return total / batch


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 5, 2, 3), (4, 6)])
def test_ofd_loss_matches_naive(shape):
    t = _rand(shape, 1)
    margin = -_rand(shape[1:2], 2).abs() - 0.1
    assert_matches_naive(lambda s: ofd_loss(s, t.float(), margin.float()), lambda s: naive_ofd(s, t, margin),
                         _rand(shape, 0))


def test_ofd_loss_by_hand():
    s = torch.tensor([[0.5, -1.0, 1.0], [-3.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-2.0, -0.2, 3.0], [-1.5, -1.0, -3.0]])
    loss = ofd_loss(s, t, torch.tensor([-1.0, -0.5, -2.0]))
    # kept: (0.5 − (−1))², (1 − 3)², (2 − (−0.5))², (0 − (−2))²; skipped: s ≤ t' ≤ 0 at (0, 1) and (1, 0)
    assert loss.item() == pytest.approx((2.25 + 4 + 6.25 + 4) / 2)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[1.5, 0.0, -2.0], [0.0, 2.5, 2.0]]))


def test_ofd_loss_is_float32_under_autocast_and_checks_shapes():
    s, t = torch.randn(2, 3, 2, 2).bfloat16(), torch.randn(2, 3, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ofd_loss(s, t, -torch.ones(3)).dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        ofd_loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 2, 2), -torch.ones(3))
    with pytest.raises(ValueError, match="one value per channel"):
        ofd_loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2), -torch.ones(4))


# ---------------------------------------------------------------------------------------------------- HCL loss
def naive_avg_pool(x, size):
    """Adaptive average pooling: bin i covers rows floor(i H / size) .. ceil((i + 1) H / size)."""
    batch, channels, height, width = x.shape
    out = [[[[None] * size for _ in range(size)] for _ in range(channels)] for _ in range(batch)]
    for b in range(batch):
        for c in range(channels):
            for i in range(size):
                for j in range(size):
                    rows = range(i * height // size, math.ceil((i + 1) * height / size))
                    cols = range(j * width // size, math.ceil((j + 1) * width / size))
                    cells = [x[b, c, r, q] for r in rows for q in cols]
                    out[b][c][i][j] = sum(cells) / len(cells)
    return torch.stack([torch.stack([torch.stack([torch.stack(row) for row in rows_]) for rows_ in channel])
                        for channel in out])


def naive_mse(a, b):
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)


def naive_hcl(s, t):
    terms = [(1.0, naive_mse(s, t))]
    for level in (4, 2, 1):
        if level < min(s.shape[2], s.shape[3]):
            terms.append((terms[-1][0] / 2, naive_mse(naive_avg_pool(s, level), naive_avg_pool(t, level))))
    return sum(w * value for w, value in terms) / sum(w for w, _ in terms)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 5, 5), (3, 2, 4, 4), (2, 3, 2, 2), (2, 4, 1, 1),
                                   (2, 2, 3, 6)])
def test_hcl_loss_matches_naive(shape):
    t = _rand(shape, 1)
    assert_matches_naive(lambda s: hcl_loss(s, t.float()), lambda s: naive_hcl(s, t), _rand(shape, 0))


def test_hcl_loss_by_hand():
    s = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])
    # full map: mean of squares 91/6; only level 1 (< 2 rows): mean 3.5, weight 1/2; normalised by 1.5
    assert hcl_loss(s, torch.zeros_like(s)).item() == pytest.approx((91 / 6 + 3.5**2 / 2) / 1.5)
    eight = torch.zeros(1, 1, 8, 8)
    eight[0, 0, 0, 0] = 8.0
    # full: 8²/64 = 1; level 4: one bin of 2, 2²/16; level 2: one bin of 1/2, (1/2)²/4; level 1: (1/8)²
    expected = (1 + 0.25 / 2 + 0.0625 / 4 + 0.015625 / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert hcl_loss(eight, torch.zeros_like(eight)).item() == pytest.approx(expected)


def test_hcl_loss_checks_shapes():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) maps of one shape"):
        hcl_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) maps of one shape"):
        hcl_loss(torch.zeros(2, 3), torch.zeros(2, 3))
