"""Tests for lightning_kd.nn.temperature: CTKD's gradient reversal, temperature range and lambda curriculum, each
against values worked out by hand from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses import kd_loss
from lightning_kd.nn import cosine_lambda, ctkd_temperature, gradient_reversal


def test_ctkd_temperature_is_float32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ctkd_temperature(torch.tensor(1.0, dtype=torch.bfloat16), 1.0)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_gradient_reversal(lam):
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = gradient_reversal(x, lam)
    torch.testing.assert_close(y.detach(), x.detach())
    (3.0 * y).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -3.0 * lam))


def test_ctkd_temperature_range_and_values():
    raw = torch.cat([torch.linspace(-50, 50, 101), torch.tensor([-1e4, 1e4])])
    temp = ctkd_temperature(raw, 1.0)
    assert temp.dtype == torch.float32
    assert (temp >= 1.0).all() and (temp <= 21.0).all()
    assert ctkd_temperature(torch.tensor(0.0), 1.0).item() == pytest.approx(11.0)
    sig1 = 1 / (1 + math.exp(-1))
    assert ctkd_temperature(torch.tensor(1.0), 1.0).item() == pytest.approx(1 + 20 * sig1)
    custom = ctkd_temperature(raw, 1.0, min_temperature=2.0, max_temperature=5.0)
    assert (custom >= 2.0).all() and (custom <= 5.0).all()
    with pytest.raises(ValueError):
        ctkd_temperature(torch.tensor(0.0), 1.0, min_temperature=3.0, max_temperature=3.0)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_ctkd_temperature_gradient_is_reversed(lam):
    theta = torch.tensor(0.7, requires_grad=True)
    ctkd_temperature(theta, lam).backward()
    sig = 1 / (1 + math.exp(-0.7))
    assert theta.grad.item() == pytest.approx(-lam * 20 * sig * (1 - sig), rel=1e-5, abs=1e-7)


def test_ctkd_temperature_ascends_kd_loss():
    """theta receives -lambda * dL/dtheta, so gradient descent on it increases L."""
    g = torch.Generator().manual_seed(61)
    s, t = 3.0 * torch.randn(6, 10, generator=g), 3.0 * torch.randn(6, 10, generator=g)
    theta = torch.tensor(0.2, requires_grad=True)
    kd_loss(s, t, ctkd_temperature(theta, 0.8)).backward()
    theta_plain = torch.tensor(0.2, requires_grad=True)
    kd_loss(s, t, 1.0 + 20.0 * torch.sigmoid(theta_plain)).backward()
    assert theta.grad.item() == pytest.approx(-0.8 * theta_plain.grad.item(), rel=1e-5)


def test_cosine_lambda_schedule():
    assert cosine_lambda(0) == pytest.approx(0.0)
    assert cosine_lambda(10) == pytest.approx(1.0)
    assert cosine_lambda(240) == pytest.approx(1.0)
    assert cosine_lambda(-3) == pytest.approx(0.0)
    assert cosine_lambda(5) == pytest.approx(0.5)
    # paper form: l_min + 1/2 (l_max - l_min) (1 + cos((1 + n / E) pi)), n = 3, E = 10
    assert cosine_lambda(3) == pytest.approx(0.5 * (1 + math.cos(1.3 * math.pi)))
    values = [cosine_lambda(e) for e in range(0, 15)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert cosine_lambda(0, max_lambda=2.0, min_lambda=0.5, warmup_epochs=20) == pytest.approx(0.5)
    assert cosine_lambda(20, max_lambda=2.0, min_lambda=0.5, warmup_epochs=20) == pytest.approx(2.0)
    assert cosine_lambda(0, warmup_epochs=0) == pytest.approx(1.0)
