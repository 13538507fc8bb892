"""Tests for lightning_kd.losses.logit.

Each loss is checked against a deliberately naive float64 re-computation of the
paper's formula (explicit python loops over samples and classes, built only
from scalar exp/log/sqrt), both for the value and for the gradient w.r.t. the
student logits, plus a tiny 2x3 case whose value is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_matches_naive, value_and_grad as _value_and_grad
from lightning_kd.losses import (
    dist_loss,
    dkd_loss,
    kd_loss,
    normkd_loss,
    standardize_logits,
)

SHAPES = [(2, 3), (5, 7), (8, 10), (4, 100)]
LN = math.log


# --------------------------------------------------------------------------- #
# naive float64 references
# --------------------------------------------------------------------------- #
def _rand(b: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * scale


def _softmax_row(row, temperature):
    """softmax(row / T) as a python list of 0-d tensors."""
    exps = [torch.exp(row[j] / temperature) for j in range(len(row))]
    z = sum(exps)
    return [e / z for e in exps]


def _kl(p, q):
    """sum_j p_j log(p_j / q_j) over python lists of 0-d tensors."""
    return sum(pj * torch.log(pj / qj) for pj, qj in zip(p, q))


def naive_kd(s, t, temperature):
    """temperature: a number, or a list with one temperature per sample."""
    batch = s.shape[0]
    total = 0.0
    for i in range(batch):
        temp = temperature[i] if isinstance(temperature, (list, tuple)) else temperature
        p_t = _softmax_row(t[i], temp)
        p_s = _softmax_row(s[i], temp)
        total = total + _kl(p_t, p_s) * temp**2
    return total / batch


def naive_dkd_parts(s, t, target, temperature):
    """Per-sample (TCKD_i, NCKD_i, teacher target prob) without the T^2 factor."""
    batch, classes = s.shape
    parts = []
    for i in range(batch):
        g = int(target[i])
        p_t = _softmax_row(t[i], temperature)
        p_s = _softmax_row(s[i], temperature)
        # binary distributions: [p(target), sum of p(other classes)]
        bt = [p_t[g], sum(p_t[j] for j in range(classes) if j != g)]
        bs = [p_s[g], sum(p_s[j] for j in range(classes) if j != g)]
        tckd = _kl(bt, bs)
        # distribution among the non-target classes only
        nt = [p_t[j] / bt[1] for j in range(classes) if j != g]
        ns = [p_s[j] / bs[1] for j in range(classes) if j != g]
        nckd = _kl(nt, ns)
        parts.append((tckd, nckd, p_t[g]))
    return parts


def naive_dkd(s, t, target, alpha, beta, temperature):
    parts = naive_dkd_parts(s, t, target, temperature)
    total = sum(alpha * tc + beta * nc for tc, nc, _ in parts)
    return total * temperature**2 / s.shape[0]


def _pearson(a, b):
    n = len(a)
    ma = sum(a) / n
    mb = sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = torch.sqrt(sum((x - ma) ** 2 for x in a))
    nb = torch.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (na * nb + 1e-8)


def naive_dist(s, t, beta, gamma, temperature):
    batch, classes = s.shape
    ys = [_softmax_row(s[i], temperature) for i in range(batch)]
    yt = [_softmax_row(t[i], temperature) for i in range(batch)]
    inter = 1 - sum(_pearson(ys[i], yt[i]) for i in range(batch)) / batch
    intra = 1 - sum(
        _pearson([ys[i][j] for i in range(batch)], [yt[i][j] for i in range(batch)])
        for j in range(classes)
    ) / classes
    return temperature**2 * (beta * inter + gamma * intra)


def _std_row(row):
    n = len(row)
    m = sum(row[j] for j in range(n)) / n
    return torch.sqrt(sum((row[j] - m) ** 2 for j in range(n)) / (n - 1)), m


def naive_standardize(z):
    rows = []
    for i in range(z.shape[0]):
        std, m = _std_row(z[i])
        rows.append(torch.stack([(z[i, j] - m) / (std + 1e-7) for j in range(z.shape[1])]))
    return torch.stack(rows)


def naive_normkd(s, t, scale):
    batch = s.shape[0]
    total = 0.0
    for i in range(batch):
        temp_t = scale * _std_row(t[i])[0]
        temp_s = scale * _std_row(s[i])[0]
        p_t = _softmax_row(t[i], temp_t)
        p_s = _softmax_row(s[i], temp_s)
        total = total + _kl(p_t, p_s) * temp_t**2
    return total / batch


# --------------------------------------------------------------------------- #
# comparison utilities
# --------------------------------------------------------------------------- #
def _assert_matches(fn_code, fn_naive, s64, rtol=1e-4, atol=1e-5):
    """Value and gradient with respect to the student input: float32 code vs the float64 naive form."""
    assert_matches_naive(fn_code, fn_naive, s64, rtol=rtol, atol=atol, grad_floor=1e-3)


# --------------------------------------------------------------------------- #
# KD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_naive(shape, temperature):
    s, t = _rand(*shape, seed=1), _rand(*shape, seed=2)
    _assert_matches(
        lambda x: kd_loss(x, t.float(), temperature),
        lambda x: naive_kd(x, t, temperature),
        s,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_kd_per_sample_temperature_matches_naive(shape):
    s, t = _rand(*shape, seed=3), _rand(*shape, seed=4)
    temps = torch.rand(shape[0], 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    temps = 0.5 + 5.0 * temps
    _assert_matches(
        lambda x: kd_loss(x, t.float(), temps.float()),
        lambda x: naive_kd(x, t, [temps[i, 0] for i in range(shape[0])]),
        s,
    )
    # gradient w.r.t. the per-sample temperatures
    out, g = _value_and_grad(lambda tt: kd_loss(s.float(), t.float(), tt), temps.float())
    ref, g_ref = _value_and_grad(lambda tt: naive_kd(s, t, [tt[i, 0] for i in range(shape[0])]), temps)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)
    # a (B,) tensor means the same thing as (B, 1)
    torch.testing.assert_close(kd_loss(s.float(), t.float(), temps.float().reshape(-1)), out)


def test_kd_scalar_tensor_temperature_gets_gradient():
    s, t = _rand(6, 10, seed=6), _rand(6, 10, seed=7)
    temp = torch.tensor(3.0, requires_grad=True)
    loss = kd_loss(s.float(), t.float(), temp)
    (g,) = torch.autograd.grad(loss, temp)
    assert torch.isfinite(g) and g.abs() > 0
    temp64 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(naive_kd(s, t, temp64), temp64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    # same value as the python-float temperature
    torch.testing.assert_close(loss.detach(), kd_loss(s.float(), t.float(), 3.0))


@pytest.mark.parametrize(
    "temperature", [1.0, 4.0, torch.tensor(2.5), torch.full((5, 1), 3.0), torch.tensor([2.0])]
)
def test_kd_zero_when_logits_equal(temperature):
    z = _rand(5, 9, seed=8).float()
    assert kd_loss(z, z.clone(), temperature).abs().item() < 1e-6


def test_kd_hand_computed():
    # row 0: student uniform (1/3 each); teacher softmax([0, ln2, ln3]) = [1/6, 2/6, 3/6]
    #   KL = 1/6 ln((1/6)/(1/3)) + 2/6 ln(1) + 3/6 ln((3/6)/(1/3))
    #      = 1/6 ln(1/2) + 1/2 ln(3/2)
    # row 1: teacher == student -> KL = 0 ; batchmean over 2 rows, T = 1
    kl0 = LN(0.5) / 6 + LN(1.5) / 2  # = 0.0872081...
    s = torch.zeros(2, 3)
    t = torch.tensor([[0.0, LN(2), LN(3)], [0.0, 0.0, 0.0]])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl0 / 2, abs=1e-6)
    # T = 2 with doubled teacher logits: same distributions, times T^2 = 4
    assert kd_loss(s, 2 * t, 2.0).item() == pytest.approx(4 * kl0 / 2, abs=1e-6)
    # per-sample T = (1, 2), both rows with teacher probabilities (1/6, 2/6, 3/6)
    # -> (1 * kl0 + 4 * kl0) / 2
    t2 = torch.tensor([[0.0, LN(2), LN(3)], [0.0, 2 * LN(2), 2 * LN(3)]])
    got = kd_loss(s, t2, torch.tensor([[1.0], [2.0]])).item()
    assert got == pytest.approx(2.5 * kl0, abs=1e-6)


# --------------------------------------------------------------------------- #
# DKD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 1.0, 1.0), (0.5, 2.0, 2.0)])
def test_dkd_matches_naive(shape, alpha, beta, temperature):
    s, t = _rand(*shape, seed=11), _rand(*shape, seed=12)
    y = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(13))
    _assert_matches(
        lambda x: dkd_loss(x, t.float(), y, alpha, beta, temperature),
        lambda x: naive_dkd(x, t, y, alpha, beta, temperature),
        s,
    )


def test_dkd_hand_computed():
    # student uniform: binary b_s = [1/3, 2/3], non-target student = [1/2, 1/2]
    # teacher probabilities (1/6, 2/6, 3/6) in both rows
    # row 0, target 0: b_t = [1/6, 5/6]
    #   TCKD0 = 1/6 ln((1/6)/(1/3)) + 5/6 ln((5/6)/(2/3)) = 1/6 ln(1/2) + 5/6 ln(5/4)
    #   non-target teacher = (2/6, 3/6) / (5/6) = (2/5, 3/5)
    #   NCKD0 = 2/5 ln(4/5) + 3/5 ln(6/5)
    # row 1, target 2: b_t = [1/2, 1/2]
    #   TCKD1 = 1/2 ln(3/2) + 1/2 ln(3/4)
    #   non-target teacher = (1/6, 2/6) / (1/2) = (1/3, 2/3)
    #   NCKD1 = 1/3 ln(2/3) + 2/3 ln(4/3)
    tckd = (LN(0.5) / 6 + 5 / 6 * LN(1.25)) + (0.5 * LN(1.5) + 0.5 * LN(0.75))
    nckd = (0.4 * LN(0.8) + 0.6 * LN(1.2)) + (LN(2 / 3) / 3 + 2 / 3 * LN(4 / 3))
    s = torch.zeros(2, 3)
    t = torch.tensor([[0.0, LN(2), LN(3)], [0.0, LN(2), LN(3)]])
    y = torch.tensor([0, 2])
    expected = 1.0 * tckd / 2 + 8.0 * nckd / 2  # summed, / batch size, T = 1
    assert dkd_loss(s, t, y, 1.0, 8.0, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 2 with doubled logits: identical distributions, times T^2 = 4
    assert dkd_loss(s, 2 * t, y, 1.0, 8.0, 2.0).item() == pytest.approx(4 * expected, abs=1e-5)
    # alpha only / beta only
    assert dkd_loss(s, t, y, 1.0, 0.0, 1.0).item() == pytest.approx(tckd / 2, abs=1e-6)
    assert dkd_loss(s, t, y, 0.0, 1.0, 1.0).item() == pytest.approx(nckd / 2, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_alpha_beta_one_relation_to_kd(temperature):
    """DKD paper, Eq. (4): KD = TCKD + (1 - p_t^T) * NCKD (per sample)."""
    s, t = _rand(6, 10, seed=14), _rand(6, 10, seed=15)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(16))
    # alpha = beta = 1 equals the naive TCKD + NCKD
    ref = naive_dkd(s, t, y, 1.0, 1.0, temperature)
    got = dkd_loss(s.float(), t.float(), y, 1.0, 1.0, temperature)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    # reassemble KD from per-sample DKD parts of the code under test
    parts = naive_dkd_parts(s, t, y, temperature)
    recon = 0.0
    for i in range(6):
        si, ti, yi = s[i : i + 1].float(), t[i : i + 1].float(), y[i : i + 1]
        tckd_i = dkd_loss(si, ti, yi, 1.0, 0.0, temperature)
        nckd_i = dkd_loss(si, ti, yi, 0.0, 1.0, temperature)
        recon = recon + tckd_i + (1 - parts[i][2].item()) * nckd_i
    kd = kd_loss(s.float(), t.float(), temperature)
    assert (recon / 6).item() == pytest.approx(kd.item(), rel=1e-4, abs=1e-6)
    # and DKD(1, 1) is not KD unless the teacher puts no mass on the target
    assert abs(got.item() - kd.item()) > 1e-4


def test_dkd_tensor_temperature_and_target_shape():
    s, t = _rand(4, 6, seed=17).float(), _rand(4, 6, seed=18).float()
    y = torch.tensor([0, 5, 2, 2])
    ref = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(dkd_loss(s, t, y.reshape(4, 1), 1.0, 8.0, 4.0), ref)
    torch.testing.assert_close(dkd_loss(s, t, y, 1.0, 8.0, torch.tensor(4.0)), ref)
    torch.testing.assert_close(dkd_loss(s, t, y, 1.0, 8.0, torch.full((4, 1), 4.0)), ref)


def test_dkd_confident_wrong_student_is_finite():
    # the student puts essentially zero mass on the target class
    s = torch.tensor([[-200.0, 200.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 0.0]])
    out, grad = _value_and_grad(lambda x: dkd_loss(x, t, torch.tensor([0]), 1.0, 8.0, 1.0), s)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------- #
# DIST
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (1.0, 3.0, 2.0)])
def test_dist_matches_naive(shape, beta, gamma, temperature):
    s, t = _rand(*shape, seed=21), _rand(*shape, seed=22)
    _assert_matches(
        lambda x: dist_loss(x, t.float(), beta, gamma, temperature),
        lambda x: naive_dist(x, t, beta, gamma, temperature),
        s,
    )


def test_dist_hand_computed():
    # student probabilities: row 0 (1/2, 1/3, 1/6), row 1 (1/6, 1/3, 1/2)
    # teacher probabilities: row 0 (1/6, 1/3, 1/2), row 1 (1/2, 1/3, 1/6)
    # inter (rows): centred student row 0 = (1/6, 0, -1/6), teacher = (-1/6, 0, 1/6)
    #   -> correlation -1 for both rows -> inter = 1 - (-1) = 2
    # intra (columns over the batch): col 0: s (1/2, 1/6), t (1/6, 1/2) -> -1
    #   col 1: s (1/3, 1/3) is constant -> covariance 0 -> correlation 0
    #   col 2: s (1/6, 1/2), t (1/2, 1/6) -> -1
    #   -> intra = 1 - (-2/3) = 5/3
    # beta = 1, gamma = 2, T = 1: 2 + 2 * 5/3 = 16/3 (eps 1e-8 changes it by ~1e-7)
    ps = torch.tensor([[1 / 2, 1 / 3, 1 / 6], [1 / 6, 1 / 3, 1 / 2]])
    pt = torch.tensor([[1 / 6, 1 / 3, 1 / 2], [1 / 2, 1 / 3, 1 / 6]])
    assert dist_loss(ps.log(), pt.log(), 1.0, 2.0, 1.0).item() == pytest.approx(16 / 3, abs=1e-5)
    # T = 2 with doubled logits: same probabilities, times T^2 = 4
    got = dist_loss(2 * ps.log(), 2 * pt.log(), 1.0, 2.0, 2.0).item()
    assert got == pytest.approx(64 / 3, abs=1e-4)
    # identical inputs without constant columns -> 0
    z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert dist_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_weights_are_separate():
    s, t = _rand(6, 8, seed=23).float(), _rand(6, 8, seed=24).float()
    inter = dist_loss(s, t, 1.0, 0.0)
    intra = dist_loss(s, t, 0.0, 1.0)
    torch.testing.assert_close(dist_loss(s, t, 2.0, 3.0), 2 * inter + 3 * intra)
    ref_intra = naive_dist(s.double(), t.double(), 0.0, 1.0, 1.0)
    ref_inter = naive_dist(s.double(), t.double(), 1.0, 0.0, 1.0)
    torch.testing.assert_close(intra.double(), ref_intra, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inter.double(), ref_inter, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- #
# logit standardization
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_standardize_matches_naive(shape):
    z = _rand(*shape, seed=31)
    w = _rand(*shape, seed=32)  # random projection to get a scalar for the gradient
    out = standardize_logits(z.float())
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out.double(), naive_standardize(z), rtol=1e-4, atol=1e-5)
    _assert_matches(
        lambda x: (standardize_logits(x) * w.float()).sum(),
        lambda x: (naive_standardize(x) * w).sum(),
        z,
    )


def test_standardize_statistics_and_invariance():
    z = _rand(7, 12, seed=33).float()
    out = standardize_logits(z)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1), torch.ones(7), atol=1e-5, rtol=0)
    shift = torch.randn(7, 1, generator=torch.Generator().manual_seed(34)) * 10
    for a in (0.1, 0.5, 3.0, 20.0):
        torch.testing.assert_close(standardize_logits(a * z + shift), out, atol=1e-5, rtol=1e-5)


def test_standardize_hand_computed():
    # (1, 2, 3): mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> (-1, 0, 1)
    # (0, 0, 6): mean 2, deviations (-2, -2, 4), var (4 + 4 + 16) / 2 = 12, std 2 sqrt(3)
    #            -> (-1/sqrt(3), -1/sqrt(3), 2/sqrt(3))
    r3 = math.sqrt(3)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1 / r3, -1 / r3, 2 / r3]])
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- #
# NormKD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_normkd_matches_naive(shape, scale):
    s, t = _rand(*shape, seed=41), _rand(*shape, seed=42)
    _assert_matches(
        lambda x: normkd_loss(x, t.float(), scale),
        lambda x: naive_normkd(x, t, scale),
        s,
    )


def test_normkd_hand_computed():
    # k = 2
    # row 0: teacher (1, 2, 3): std 1 -> Tt = 2 -> (0.5, 1, 1.5)
    #        student (2, 4, 6): std 2 -> Ts = 4 -> (0.5, 1, 1.5) -> KL = 0
    # row 1: teacher (0, 0, 3): mean 1, var (1 + 1 + 4) / 2 = 3, std sqrt(3)
    #        -> Tt = 2 sqrt(3) -> (0, 0, a), a = sqrt(3) / 2
    #        student (0, 3, 0): same std -> (0, a, 0)
    #        p_t = (1, 1, e^a) / Z, p_s = (1, e^a, 1) / Z with Z = 2 + e^a
    #        KL = [1 * ln(1 / e^a) + e^a * ln(e^a / 1)] / Z = a (e^a - 1) / (2 + e^a)
    #        times Tt^2 = 12
    a = math.sqrt(3) / 2
    expected = (0.0 + 12 * a * (math.exp(a) - 1) / (2 + math.exp(a))) / 2
    s = torch.tensor([[2.0, 4.0, 6.0], [0.0, 3.0, 0.0]])
    t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    assert normkd_loss(s, t, 2.0).item() == pytest.approx(expected, abs=1e-5)


def test_normkd_scaling_properties():
    s, t = _rand(6, 10, seed=43).float(), _rand(6, 10, seed=44).float()
    base = normkd_loss(s, t)
    # the student is normalised by its own std: affine changes do not matter
    torch.testing.assert_close(normkd_loss(3.0 * s + 1.5, t), base, rtol=1e-4, atol=1e-5)
    # the teacher's std sets T^2: scaling teacher logits by c scales the loss by c^2
    torch.testing.assert_close(normkd_loss(s, 2.0 * t), 4.0 * base, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- #
# dtype under autocast
# --------------------------------------------------------------------------- #
def _bf16_cases():
    s = _rand(4, 10, seed=51).to(torch.bfloat16)
    t = _rand(4, 10, seed=52).to(torch.bfloat16)
    y = torch.tensor([1, 0, 9, 3])
    return {
        "kd": lambda: kd_loss(s, t, 4.0),
        "kd_tensor_T": lambda: kd_loss(s, t, torch.tensor(4.0, dtype=torch.bfloat16)),
        "dkd": lambda: dkd_loss(s, t, y),
        "dist": lambda: dist_loss(s, t, temperature=4.0),
        "standardize": lambda: standardize_logits(s),
        "normkd": lambda: normkd_loss(s, t),
    }


@pytest.mark.parametrize("name", list(_bf16_cases()))
def test_float32_under_bf16_autocast(name):
    fn = _bf16_cases()[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn()
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- #
# dense outputs: per pixel (B, C, H, W) and per token (B, T, V)
# --------------------------------------------------------------------------- #
# 12 pixels of 4 classes; 6 tokens of a 5-word vocabulary
DENSE_SHAPES = {"pixels": (2, 4, 2, 3), "tokens": (2, 3, 5)}
IGNORE = -100


def _dense(kind: str, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*DENSE_SHAPES[kind], generator=g, dtype=torch.float64) * scale


def _classes(kind: str) -> int:
    return DENSE_SHAPES[kind][1] if kind == "pixels" else DENSE_SHAPES[kind][2]


def _position_shape(kind: str) -> tuple:
    b, c, *rest = DENSE_SHAPES[kind]
    return (b, *rest) if kind == "pixels" else (b, c)


def _position_indices(kind: str) -> list:
    """Every position (b, h, w) / (b, t), sample by sample."""
    shape = _position_shape(kind)
    if kind == "pixels":
        return [(b, h, w) for b in range(shape[0]) for h in range(shape[1]) for w in range(shape[2])]
    return [(b, i) for b in range(shape[0]) for i in range(shape[1])]


def _row(x: torch.Tensor, kind: str, index: tuple) -> torch.Tensor:
    """The logits of one position as a (1, C) matrix."""
    if kind == "pixels":
        b, h, w = index
        return x[b, :, h, w].unsqueeze(0)
    b, i = index
    return x[b, i, :].unsqueeze(0)


def _mask(kind: str, seed: int) -> torch.Tensor:
    """A random boolean mask with the first position kept and the last one left out."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(_position_shape(kind), generator=g) < 0.6
    mask.view(-1)[0], mask.view(-1)[-1] = True, False
    return mask


def _labels(kind: str, seed: int, ignored: bool) -> torch.Tensor:
    """Random labels; with ``ignored``, about a third of them (the last one always) are IGNORE."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, _classes(kind), _position_shape(kind), generator=g)
    if ignored:
        drop = torch.rand(_position_shape(kind), generator=g) < 0.35
        drop.view(-1)[0], drop.view(-1)[-1] = False, True
        labels = labels.masked_fill(drop, IGNORE)
    return labels


def naive_dense(kind, valid, per_position):
    """sum over the valid positions of per_position(index) / their number, by a python loop."""
    total, count = 0.0, 0
    for index in _position_indices(kind):
        if bool(valid[index]):
            total = total + per_position(index)
            count += 1
    return total / count


def _valid_rows(x, kind, valid):
    """(N, C) matrix of the valid positions' logits, in position order."""
    return torch.cat([_row(x, kind, index) for index in _position_indices(kind) if bool(valid[index])])


def _selection(kind, how, seed):
    """(kwargs of the loss, labels for target-taking losses, valid positions) for one way of leaving positions out."""
    if how == "mask":
        mask = _mask(kind, seed)
        labels = _labels(kind, seed + 1, ignored=False)
        return {"mask": mask}, labels, mask
    if how == "ignore_index":
        labels = _labels(kind, seed + 1, ignored=True)
        return {}, labels, labels != IGNORE
    mask, labels = _mask(kind, seed), _labels(kind, seed + 1, ignored=True)  # both: a position must pass each
    return {"mask": mask}, labels, mask & (labels != IGNORE)


# each per-position loss: the code under test (student, teacher, labels, **selection) and its naive value at one
# position (student row, teacher row, label); losses without a target get the labels only through ``target=``
PER_POSITION_LOSSES = {
    "kd": (
        lambda s, t, y, **kw: kd_loss(s, t, 2.0, target=y, **kw),
        lambda s, t, y: naive_kd(s, t, 2.0),
    ),
    "dkd": (
        lambda s, t, y, **kw: dkd_loss(s, t, y, 1.0, 2.0, 2.0, **kw),
        lambda s, t, y: naive_dkd(s, t, [y], 1.0, 2.0, 2.0),
    ),
    "normkd": (
        lambda s, t, y, **kw: normkd_loss(s, t, 2.0, target=y, **kw),
        lambda s, t, y: naive_normkd(s, t, 2.0),
    ),
}
SELECTIONS = ["mask", "ignore_index", "mask_and_ignore_index"]


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("how", SELECTIONS)
@pytest.mark.parametrize("name", list(PER_POSITION_LOSSES))
def test_dense_per_position_losses_match_naive_loop(name, how, kind):
    loss, naive = PER_POSITION_LOSSES[name]
    s, t = _dense(kind, seed=101), _dense(kind, seed=102)
    kwargs, labels, valid = _selection(kind, how, seed=103)
    assert 0 < int(valid.sum()) < valid.numel()
    _assert_matches(
        lambda x: loss(x, t.float(), labels, **kwargs),
        lambda x: naive_dense(kind, valid, lambda i: naive(_row(x, kind, i), _row(t, kind, i), labels[i])),
        s,
    )


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("how", SELECTIONS)
def test_dense_dist_matches_naive_on_the_valid_positions(how, kind):
    """DIST on dense outputs: every valid position is one sample of the naive (N, C) formula."""
    s, t = _dense(kind, seed=111), _dense(kind, seed=112)
    kwargs, labels, valid = _selection(kind, how, seed=113)
    _assert_matches(
        lambda x: dist_loss(x, t.float(), 1.0, 2.0, 2.0, target=labels, **kwargs),
        lambda x: naive_dist(_valid_rows(x, kind, valid), _valid_rows(t, kind, valid), 1.0, 2.0, 2.0),
        s,
    )


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("name", [*PER_POSITION_LOSSES, "dist"])
def test_dense_equals_the_flattened_call_on_the_valid_positions(name, kind):
    loss = PER_POSITION_LOSSES[name][0] if name != "dist" else (
        lambda s, t, y, **kw: dist_loss(s, t, 1.0, 2.0, 2.0, target=y, **kw))
    s, t = _dense(kind, seed=121).float(), _dense(kind, seed=122).float()
    kwargs, labels, valid = _selection(kind, "mask_and_ignore_index", seed=123)
    flat_labels = labels[valid]  # position order, like _valid_rows
    expected = loss(_valid_rows(s, kind, valid), _valid_rows(t, kind, valid), flat_labels)
    torch.testing.assert_close(loss(s, t, labels, **kwargs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*PER_POSITION_LOSSES, "dist"])
def test_a_batch_of_samples_is_the_dense_case_with_one_position_each(name):
    """(B, C) keeps its batch mean: identical to (B, C, 1, 1) pixels and (B, 1, C) tokens."""
    loss = PER_POSITION_LOSSES[name][0] if name != "dist" else (
        lambda s, t, y, **kw: dist_loss(s, t, 1.0, 2.0, 2.0, **kw))
    s, t = _rand(5, 7, seed=124).float(), _rand(5, 7, seed=125).float()
    y = torch.randint(0, 7, (5,), generator=torch.Generator().manual_seed(126))
    out = loss(s, t, y)
    assert torch.equal(loss(s[:, :, None, None], t[:, :, None, None], y[:, None, None]), out)
    assert torch.equal(loss(s[:, None, :], t[:, None, :], y[:, None]), out)


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
def test_dense_kd_per_sample_temperature_applies_to_every_position(kind):
    s, t = _dense(kind, seed=131), _dense(kind, seed=132)
    mask = _mask(kind, seed=133)
    temps = torch.tensor([1.5, 4.0], dtype=torch.float64)
    _assert_matches(
        lambda x: kd_loss(x, t.float(), temps.float(), mask=mask),
        lambda x: naive_dense(kind, mask, lambda i: naive_kd(_row(x, kind, i), _row(t, kind, i), temps[i[0]])),
        s,
    )


def test_dense_hand_computed():
    # pixel (0, 0): student uniform, teacher softmax([0, ln2, ln3]) = (1/6, 2/6, 3/6):
    #   KL = 1/6 ln(1/2) + 1/2 ln(3/2) (as in test_kd_hand_computed)
    # pixel (0, 1): NaN logits, labelled IGNORE -> left out; T = 1
    kl0 = LN(0.5) / 6 + LN(1.5) / 2
    s = torch.tensor([[0.0, 0.0, 0.0], [math.nan] * 3]).T.reshape(1, 3, 1, 2)
    t = torch.tensor([[0.0, LN(2), LN(3)], [math.nan] * 3]).T.reshape(1, 3, 1, 2)
    y = torch.tensor([[[2, IGNORE]]])
    out, grad = _value_and_grad(lambda x: kd_loss(x, t, 1.0, target=y), s)
    assert out.item() == pytest.approx(kl0, abs=1e-6)
    assert torch.isfinite(grad).all() and torch.equal(grad[..., 1], torch.zeros(1, 3, 1))
    # DKD on tokens: the two rows of test_dkd_hand_computed plus a third, masked, token
    tckd = (LN(0.5) / 6 + 5 / 6 * LN(1.25)) + (0.5 * LN(1.5) + 0.5 * LN(0.75))
    nckd = (0.4 * LN(0.8) + 0.6 * LN(1.2)) + (LN(2 / 3) / 3 + 2 / 3 * LN(4 / 3))
    tokens_s = torch.zeros(1, 3, 3)
    tokens_t = torch.tensor([[[0.0, LN(2), LN(3)], [0.0, LN(2), LN(3)], [9.0, 0.0, -9.0]]])
    got = dkd_loss(tokens_s, tokens_t, torch.tensor([[0, 2, 1]]), 1.0, 8.0, 1.0, mask=torch.tensor([[1, 1, 0]]).bool())
    assert got.item() == pytest.approx(tckd / 2 + 8.0 * nckd / 2, abs=1e-6)
    # DIST: the 2 x 3 case of test_dist_hand_computed as two pixels, plus an ignored third one -> 16/3
    ps = torch.tensor([[1 / 2, 1 / 3, 1 / 6], [1 / 6, 1 / 3, 1 / 2], [0.9, 0.05, 0.05]])
    pt = torch.tensor([[1 / 6, 1 / 3, 1 / 2], [1 / 2, 1 / 3, 1 / 6], [0.05, 0.05, 0.9]])
    pixels_s, pixels_t = ps.log().T.reshape(1, 3, 1, 3), pt.log().T.reshape(1, 3, 1, 3)
    got = dist_loss(pixels_s, pixels_t, 1.0, 2.0, 1.0, target=torch.tensor([[[0, 1, IGNORE]]]))
    assert got.item() == pytest.approx(16 / 3, abs=1e-5)


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("name", [*PER_POSITION_LOSSES, "dist"])
def test_left_out_positions_cannot_leak_nan(name, kind):
    """NaN/inf logits at left-out positions (padding) change neither the value nor the other gradients."""
    loss = PER_POSITION_LOSSES[name][0] if name != "dist" else (
        lambda s, t, y, **kw: dist_loss(s, t, 1.0, 2.0, 2.0, target=y, **kw))
    s, t = _dense(kind, seed=141).float(), _dense(kind, seed=142).float()
    kwargs, labels, valid = _selection(kind, "mask_and_ignore_index", seed=143)
    class_dim = 1 if kind == "pixels" else -1
    left_out = (~valid).unsqueeze(class_dim).expand_as(s)
    bad_s = s.masked_fill(left_out, math.nan)
    bad_t = t.masked_fill(left_out, math.inf)
    out, grad = _value_and_grad(lambda x: loss(x, t, labels, **kwargs), s)
    bad_out, bad_grad = _value_and_grad(lambda x: loss(x, bad_t, labels, **kwargs), bad_s)
    torch.testing.assert_close(bad_out, out)
    torch.testing.assert_close(bad_grad, grad)
    assert torch.equal(grad[left_out], torch.zeros(int(left_out.sum())))


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("name", [*PER_POSITION_LOSSES, "dist"])
def test_no_valid_position_gives_zero(name, kind):
    """A batch whose positions are all left out (all padding) gives 0 with zero gradients, not NaN or an error."""
    loss = PER_POSITION_LOSSES[name][0] if name != "dist" else (
        lambda s, t, y, **kw: dist_loss(s, t, 1.0, 2.0, 2.0, target=y, **kw))
    s, t = _dense(kind, seed=151).float(), _dense(kind, seed=152).float()
    labels = _labels(kind, seed=153, ignored=False)
    nothing = torch.zeros(_position_shape(kind), dtype=torch.bool)
    for kwargs, y in (({"mask": nothing}, labels), ({}, torch.full_like(labels, IGNORE))):
        out, grad = _value_and_grad(lambda x: loss(x, t, y, **kwargs), s)
        assert out.dtype == torch.float32 and out.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_class_dim_defaults_and_explicit():
    s, t = _rand(6, 8, seed=161).float().reshape(2, 3, 8), _rand(6, 8, seed=162).float().reshape(2, 3, 8)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    y = torch.randint(0, 8, (2, 3), generator=torch.Generator().manual_seed(163))
    # tokens (B, T, V): the default is the last dim; the same data as (B, V, T) needs class_dim=1
    for fn in (lambda a, b, **kw: kd_loss(a, b, 2.0, mask=mask, **kw),
               lambda a, b, **kw: dkd_loss(a, b, y, mask=mask, **kw),
               lambda a, b, **kw: dist_loss(a, b, mask=mask, **kw),
               lambda a, b, **kw: normkd_loss(a, b, mask=mask, **kw)):
        out = fn(s, t)
        torch.testing.assert_close(fn(s, t, class_dim=-1), out)
        torch.testing.assert_close(fn(s, t, class_dim=2), out)
        torch.testing.assert_close(fn(s.transpose(1, 2), t.transpose(1, 2), class_dim=1), out)
    # pixels: (B, C, H, W) by default, channels-last (B, H, W, C) with class_dim=-1
    p_s, p_t = _dense("pixels", seed=164).float(), _dense("pixels", seed=165).float()
    out = kd_loss(p_s, p_t)
    torch.testing.assert_close(kd_loss(p_s.permute(0, 2, 3, 1), p_t.permute(0, 2, 3, 1), class_dim=-1), out)


def test_dense_standardize_per_position():
    for kind, class_dim in (("pixels", 1), ("tokens", 2)):
        z = _dense(kind, seed=171)
        out = standardize_logits(z.float())
        assert out.shape == z.shape and out.dtype == torch.float32
        for index in _position_indices(kind):
            expected = naive_standardize(_row(z, kind, index))
            got = _row(out, kind, index).double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # an explicit class_dim moves the statistics
        moved = standardize_logits(z.float().movedim(class_dim, -1), class_dim=-1)
        torch.testing.assert_close(moved.movedim(-1, class_dim), out)


def _dense_bf16_cases():
    s = _dense("pixels", seed=181).to(torch.bfloat16)
    t = _dense("pixels", seed=182).to(torch.bfloat16)
    y = _labels("pixels", seed=183, ignored=True)
    mask = _mask("pixels", seed=184)
    return {
        "kd": lambda a, b: kd_loss(a, b, 2.0, mask=mask, target=y),
        "dkd": lambda a, b: dkd_loss(a, b, y, mask=mask),
        "dist": lambda a, b: dist_loss(a, b, temperature=2.0, mask=mask, target=y),
        "normkd": lambda a, b: normkd_loss(a, b, mask=mask, target=y),
        "standardize": lambda a, b: standardize_logits(a),
    }, s, t


@pytest.mark.parametrize("name", list(_dense_bf16_cases()[0]))
def test_dense_bf16_inputs_give_float32(name):
    """bf16 logits are upcast before any maths: the result is float32 and equals the float32 call."""
    cases, s, t = _dense_bf16_cases()
    out = cases[name](s, t)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, cases[name](s.float(), t.float()), rtol=1e-6, atol=1e-6)


def test_dense_bad_arguments():
    s = torch.zeros(2, 3, 4, 5)
    y = torch.zeros(2, 4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="boolean"):
        kd_loss(s, s, mask=torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(2, 4, 5\)"):
        kd_loss(s, s, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target must have the shape .*\(2, 4, 5\)"):
        dkd_loss(s, s, y[:, 0])
    with pytest.raises(ValueError, match="class_dim must not be 0"):
        kd_loss(s, s, class_dim=0)
    with pytest.raises(ValueError, match="out of range"):
        normkd_loss(s, s, class_dim=4)
    with pytest.raises(ValueError, match="out of range"):
        standardize_logits(s, class_dim=-5)
    with pytest.raises(ValueError, match=r"\(B, C\), \(B, C, H, W\) or \(B, T, V\)"):
        dist_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, s[:, :, :, :4])
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, torch.ones(2, 4))  # one temperature per sample or per batch, not per pixel


# --------------------------------------------------------------------------- #
# argument checking
# --------------------------------------------------------------------------- #
def test_bad_arguments():
    s, t = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError):
        kd_loss(s, t)
    with pytest.raises(ValueError):
        kd_loss(s, s, 0.0)
    with pytest.raises(ValueError):
        kd_loss(s, s, torch.ones(3, 1))
    with pytest.raises(ValueError):
        dkd_loss(s, s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        dist_loss(s, s, temperature=torch.ones(2, 1))
