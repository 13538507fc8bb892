"""Tests for lightning_kd.losses.feature.

Each loss is checked against a deliberately naive float64 re-computation of
the paper's formula (explicit python loops over samples, channels and
positions), both for the value and for the gradient w.r.t. the student
feature, plus a tiny case whose value is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_matches_naive, value_and_grad as _value_and_grad
from lightning_kd.losses import at_loss, fitnet_loss, logsum_distance, nst_loss

# (student shape, teacher shape): equal maps, different channels, different spatial sizes
MAP_PAIRS = [
    ((2, 3, 2, 2), (2, 3, 2, 2)),
    ((3, 4, 4, 4), (3, 6, 4, 4)),
    ((2, 3, 4, 4), (2, 5, 2, 2)),  # student pooled 4x4 -> 2x2
    ((2, 3, 3, 3), (2, 2, 6, 6)),  # teacher pooled 6x6 -> 3x3
    ((2, 2, 4, 6), (2, 3, 2, 3)),  # non-square maps
]


# --------------------------------------------------------------------------- #
# naive float64 references
# --------------------------------------------------------------------------- #
def _rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def naive_adaptive_avg_pool(x, out_h, out_w):
    """Adaptive average pooling: bin i covers rows floor(i H / h) .. ceil((i + 1) H / h)."""
    batch, channels, height, width = x.shape
    out = []
    for b in range(batch):
        chans = []
        for c in range(channels):
            rows = []
            for i in range(out_h):
                r0, r1 = (i * height) // out_h, math.ceil((i + 1) * height / out_h)
                row = []
                for j in range(out_w):
                    c0, c1 = (j * width) // out_w, math.ceil((j + 1) * width / out_w)
                    cells = [x[b, c, r, q] for r in range(r0, r1) for q in range(c0, c1)]
                    row.append(sum(cells) / len(cells))
                rows.append(torch.stack(row))
            chans.append(torch.stack(rows))
        out.append(torch.stack(chans))
    return torch.stack(out)


def _naive_common_size(s, t):
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if tuple(s.shape[2:]) != (h, w):
        s = naive_adaptive_avg_pool(s, h, w)
    if tuple(t.shape[2:]) != (h, w):
        t = naive_adaptive_avg_pool(t, h, w)
    return s, t


def _naive_attention(fb, p):
    """One sample (C, H, W) -> list of H*W attention values, unit L2 norm."""
    channels = fb.shape[0]
    flat = [fb[c].reshape(-1) for c in range(channels)]
    a = [sum(abs(flat[c][j]) ** p for c in range(channels)) / channels for j in range(len(flat[0]))]
    norm = torch.sqrt(sum(v**2 for v in a))
    return [v / norm for v in a]


def naive_at(s, t, p):
    s, t = _naive_common_size(s, t)
    batch = s.shape[0]
    total, count = 0.0, 0
    for b in range(batch):
        qs, qt = _naive_attention(s[b], p), _naive_attention(t[b], p)
        for j in range(len(qs)):
            total = total + (qs[j] - qt[j]) ** 2
            count += 1
    return total / count


def _unit_channels(fb):
    """One sample (C, H, W) -> list of C channel vectors over positions, unit norm."""
    out = []
    for c in range(fb.shape[0]):
        v = fb[c].reshape(-1)
        out.append(v / torch.sqrt(sum(x**2 for x in v)))
    return out


def _mean_kernel(xs, ys):
    """mean over all pairs of (x . y)^2 -- polynomial kernel, d = 2, c = 0."""
    return sum(torch.dot(x, y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))


def naive_nst(s, t):
    s, t = _naive_common_size(s, t)
    total = 0.0
    for b in range(s.shape[0]):
        cs, ct = _unit_channels(s[b]), _unit_channels(t[b])
        total = total + _mean_kernel(ct, ct) + _mean_kernel(cs, cs) - 2 * _mean_kernel(cs, ct)
    return total / s.shape[0]


def naive_fitnet(s, t):
    s, t = s.reshape(-1), t.reshape(-1)
    return sum((s[i] - t[i]) ** 2 for i in range(len(s))) / len(s)


def naive_logsum(s, t, alpha):
    s, t = s.reshape(-1), t.reshape(-1)
    return torch.log(sum(abs(s[i] - t[i]) ** alpha for i in range(len(s))))


# --------------------------------------------------------------------------- #
# comparison utilities
# --------------------------------------------------------------------------- #
def _assert_matches(fn_code, fn_naive, s64, rtol=1e-4, atol=1e-6):
    """Value and gradient with respect to the student input: float32 code vs the float64 naive form."""
    assert_matches_naive(fn_code, fn_naive, s64, rtol=rtol, atol=atol, grad_floor=1e-6)


# --------------------------------------------------------------------------- #
# naive pooling agrees with torch (sanity check of the reference itself)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("size,out", [((4, 4), (2, 2)), ((6, 6), (3, 3)), ((5, 7), (2, 3))])
def test_naive_pool_matches_torch(size, out):
    x = _rand((2, 2, *size), seed=0)
    torch.testing.assert_close(naive_adaptive_avg_pool(x, *out), F.adaptive_avg_pool2d(x, out))


# --------------------------------------------------------------------------- #
# AT
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", MAP_PAIRS)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_matches_naive(shapes, p):
    s, t = _rand(shapes[0], seed=1), _rand(shapes[1], seed=2)
    _assert_matches(lambda x: at_loss(x, t.float(), p), lambda x: naive_at(x, t, p), s)


def test_at_hand_computed():
    # sample 0: student channels (1, 0) and (1, 0) -> a = mean_c f^2 = (1, 0) -> Q_s = (1, 0)
    #           teacher all ones              -> a = (1, 1) -> Q_t = (1, 1) / sqrt(2)
    #           squared differences: (1 - 1/sqrt2)^2 + 1/2 = 2 - sqrt(2)
    # sample 1: student (0, 3) in both channels -> Q_s = (0, 1); teacher (0, -2) -> Q_t = (0, 1)
    #           -> 0
    # mean over 2 samples x 2 positions: (2 - sqrt(2)) / 4
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 3.0]], [[0.0, 3.0]]]])
    t = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]], [[[0.0, -2.0]], [[0.0, -2.0]]]])
    assert at_loss(s, t).item() == pytest.approx((2 - math.sqrt(2)) / 4, abs=1e-6)


def test_at_pools_the_larger_map():
    # student 2x4 map pooled to the teacher's 1x2: bins are the 2x2 blocks
    # student block means: left (1 + 1 + 1 + 1) / 4 = 1, right 0 -> Q_s = (1, 0)
    # teacher (1, 1) -> Q_t = (1, 1)/sqrt(2) -> loss (2 - sqrt(2)) / 2 (one sample)
    s = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]]])
    t = torch.ones(1, 3, 1, 2)
    expected = (2 - math.sqrt(2)) / 2
    assert at_loss(s, t).item() == pytest.approx(expected, abs=1e-6)
    # symmetric: the teacher is pooled when it is the larger one
    assert at_loss(t, s).item() == pytest.approx(expected, abs=1e-6)
    # same as pooling by hand first
    big, small = _rand((2, 3, 8, 8), seed=3).float(), _rand((2, 5, 4, 4), seed=4).float()
    pooled = F.adaptive_avg_pool2d(big, (4, 4))
    torch.testing.assert_close(at_loss(big, small), at_loss(pooled, small))
    torch.testing.assert_close(at_loss(small, big), at_loss(small, pooled))


def test_at_zero_and_invariances():
    f = _rand((3, 4, 5, 5), seed=5).float()
    assert at_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # the normalised attention map ignores a global scale and the channel count
    assert at_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-7)
    assert at_loss(f, torch.cat([f, f], dim=1)).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- #
# NST
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", MAP_PAIRS)
def test_nst_matches_naive(shapes):
    s, t = _rand(shapes[0], seed=11), _rand(shapes[1], seed=12)
    _assert_matches(lambda x: nst_loss(x, t.float()), lambda x: naive_nst(x, t), s)


def test_nst_hand_computed():
    # one sample, two positions; unit channel vectors:
    #   student (3, 0) -> e1, (0, 2) -> e2 ; teacher (5, 0) -> e1, (0.5, 0) -> e1
    # k(x, y) = (x . y)^2
    #   teacher-teacher: all four pairs 1           -> mean 1
    #   student-student: I (1, 0, 0, 1)            -> mean 1/2
    #   student-teacher: e1.e1 = 1 twice, e2.e1 = 0 -> mean 1/2
    # loss = 1 + 1/2 - 2 * 1/2 = 1/2
    s = torch.tensor([[[[3.0, 0.0]], [[0.0, 2.0]]]])
    t = torch.tensor([[[[5.0, 0.0]], [[0.5, 0.0]]]])
    assert nst_loss(s, t).item() == pytest.approx(0.5, abs=1e-6)
    # batch of two: second sample identical maps -> 0; mean over the batch -> 1/4
    s2 = torch.cat([s, t])
    t2 = torch.cat([t, t])
    assert nst_loss(s2, t2).item() == pytest.approx(0.25, abs=1e-6)


def test_nst_zero_when_equal_and_teacher_term_detached():
    f = _rand((2, 4, 3, 3), seed=13).float()
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # the teacher-teacher kernel term carries no gradient: the teacher's
    # gradient is that of the cross term -2 mean k(s, t) only
    s, t = _rand((2, 3, 3, 3), seed=14), _rand((2, 4, 3, 3), seed=15)
    _, g = _value_and_grad(lambda x: nst_loss(s.float(), x), t.float())

    def cross_only(x):
        total = 0.0
        for b in range(2):
            total = total - 2 * _mean_kernel(_unit_channels(s[b]), _unit_channels(x[b]))
        return total / 2

    _, g_ref = _value_and_grad(cross_only, t)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- #
# FitNets
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(2, 3), (3, 4, 5, 5), (2, 8, 2, 3)])
def test_fitnet_matches_naive(shape):
    s, t = _rand(shape, seed=21), _rand(shape, seed=22)
    _assert_matches(lambda x: fitnet_loss(x, t.float()), lambda x: naive_fitnet(x, t), s)


def test_fitnet_hand_computed():
    # (1 + 4 + 9 + 16 + 25 + 36) / 6 = 91 / 6 ; against ones: (0 + 1 + 4 + 9 + 16 + 25) / 6 = 55 / 6
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert fitnet_loss(s, torch.zeros(2, 3)).item() == pytest.approx(91 / 6, abs=1e-5)
    assert fitnet_loss(s, torch.ones(2, 3)).item() == pytest.approx(55 / 6, abs=1e-5)
    assert fitnet_loss(s, s.clone()).item() == 0.0


def test_fitnet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 1, 1))  # no broadcasting


# --------------------------------------------------------------------------- #
# LogSum distance
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(2, 3), (8, 16), (4, 3, 2, 2)])
@pytest.mark.parametrize("alpha", [4.0, 2.0, 5.0])
def test_logsum_matches_naive(shape, alpha):
    s, t = _rand(shape, seed=31), _rand(shape, seed=32)
    _assert_matches(
        lambda x: logsum_distance(x, t.float(), alpha),
        lambda x: naive_logsum(x, t, alpha),
        s,
    )


def test_logsum_hand_computed():
    # |d|^4 = 1 + 1 + 0 + 16 + 0 + 0 = 18 -> ln 18 (summed, not averaged)
    s = torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    t = torch.zeros(2, 3)
    assert logsum_distance(s, t).item() == pytest.approx(math.log(18), abs=1e-6)
    # alpha = 2: 1 + 1 + 4 = 6 ; with eps = 2: ln(8)
    assert logsum_distance(s, t, alpha=2.0).item() == pytest.approx(math.log(6), abs=1e-6)
    assert logsum_distance(s, t, alpha=2.0, eps=2.0).item() == pytest.approx(math.log(8), abs=1e-6)
    # gradient: d/ds ln(S) = alpha |d|^(alpha-1) sign(d) / S -> row 0: (4, -4, 0) / 18
    _, g = _value_and_grad(lambda x: logsum_distance(x, t), s)
    expected = torch.tensor([[4.0, -4.0, 0.0], [32.0, 0.0, 0.0]]) / 18
    torch.testing.assert_close(g, expected)


def test_logsum_equal_inputs():
    f = _rand((4, 6), seed=33).float()
    # no epsilon, as in the official code: log(0) = -inf
    assert logsum_distance(f, f.clone()).item() == float("-inf")
    x = f.clone().requires_grad_(True)
    out = logsum_distance(x, f, eps=1e-5)
    assert out.item() == pytest.approx(math.log(1e-5), rel=1e-6)
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(g))


def test_logsum_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        logsum_distance(torch.zeros(4, 8), torch.zeros(4, 16))


# --------------------------------------------------------------------------- #
# shapes, batch sizes, dtype under autocast
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [at_loss, nst_loss, fitnet_loss, logsum_distance])
def test_batch_size_mismatch_raises(fn):
    with pytest.raises(ValueError, match="batch"):
        fn(torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4))


@pytest.mark.parametrize("fn", [at_loss, nst_loss])
def test_map_losses_need_4d_inputs(fn):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(torch.rand(2, 16), torch.rand(2, 16))


def _bf16_cases():
    s = _rand((2, 3, 4, 4), seed=41).to(torch.bfloat16)
    t = _rand((2, 5, 2, 2), seed=42).to(torch.bfloat16)
    t_same = _rand((2, 3, 4, 4), seed=43).to(torch.bfloat16)
    return {
        "at": lambda: at_loss(s, t),
        "nst": lambda: nst_loss(s, t),
        "fitnet": lambda: fitnet_loss(s, t_same),
        "logsum": lambda: logsum_distance(s.flatten(1), t_same.flatten(1)),
    }


@pytest.mark.parametrize("name", list(_bf16_cases()))
def test_float32_under_bf16_autocast(name):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _bf16_cases()[name]()
    assert out.dtype == torch.float32
    assert out.shape == ()
    assert torch.isfinite(out)
