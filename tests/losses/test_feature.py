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
from lightning_kd.losses import (ab_loss, at_loss, fitnet_loss, fsp_loss, fsp_matrix, ft_loss, logsum_distance,
                                 nst_loss, pool_to_common_size, vid_loss)

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


# --------------------------------------------------------------------------- #
# losses of the methods with learnt adapters or a pre-training phase: VID, FSP, AB, FT
# --------------------------------------------------------------------------- #
def naive_block_pool(x, out_h, out_w):
    """Average pooling of (B, C, H, W) over equal blocks (H, W multiples of the output size)."""
    batch, channels, height, width = x.shape
    bh, bw = height // out_h, width // out_w
    out = torch.zeros(batch, channels, out_h, out_w, dtype=x.dtype)
    rows = []
    for b in range(batch):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    cells = [x[b, c, i * bh + r, j * bw + q] for r in range(bh) for q in range(bw)]
                    rows.append(sum(cells) / len(cells))
    return torch.stack(rows).reshape(out.shape) if rows else out


def naive_common_size(s, t):
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if tuple(s.shape[2:]) != (h, w):
        s = naive_block_pool(s, h, w)
    if tuple(t.shape[2:]) != (h, w):
        t = naive_block_pool(t, h, w)
    return s, t


def assert_matches(fn_code, fn_naive, x64):
    assert_matches_naive(fn_code, fn_naive, x64, rtol=1e-4, atol=1e-6, grad_floor=1e-6)


# ------------------------------------------------------------------------------------------------------------ VID
def naive_vid(mean, target, variance):
    total, count = 0.0, 0
    flat_mean, flat_target = mean.reshape(mean.shape[0], mean.shape[1], -1), target.reshape(mean.shape[0],
                                                                                            mean.shape[1], -1)
    for b in range(flat_mean.shape[0]):
        for c in range(flat_mean.shape[1]):
            for j in range(flat_mean.shape[2]):
                error = flat_target[b, c, j] - flat_mean[b, c, j]
                total = total + 0.5 * (torch.log(variance[c]) + error**2 / variance[c])
                count += 1
    return total / count


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2, 2), (3, 2, 1, 3)])
def test_vid_matches_naive_in_the_mean_and_the_variance(shape):
    mean, target = _rand(shape, seed=1), _rand(shape, seed=2)
    variance = torch.rand(shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    assert_matches(lambda m: vid_loss(m, target.float(), variance.float()), lambda m: naive_vid(m, target, variance),
                   mean)
    assert_matches(lambda v: vid_loss(mean.float(), target.float(), v), lambda v: naive_vid(mean, target, v), variance)


def test_vid_hand_computed():
    # variances (1, 1, 4); element terms 0.5 (log σ² + e²/σ²):
    #   sample 0: e = (1, 0, 2) -> 0.5, 0, 0.5 (log 4 + 1)
    #   sample 1: e = (0, 1, 0) -> 0, 0.5, 0.5 log 4
    #   sum 1.5 + log 4 over 6 elements
    target = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    loss = vid_loss(torch.zeros(2, 3), target, torch.tensor([1.0, 1.0, 4.0]))
    assert loss.item() == pytest.approx((1.5 + math.log(4)) / 6, abs=1e-6)


def test_vid_checks_shapes():
    with pytest.raises(ValueError, match="vid_loss: student and teacher tensors must have the same shape"):
        vid_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"one value per channel \(shape \(3,\)"):
        vid_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(4))


# ------------------------------------------------------------------------------------------------------------ FSP
def naive_fsp_matrix(bottom, top):
    bottom, top = naive_common_size(bottom, top)
    batch, c1, c2 = bottom.shape[0], bottom.shape[1], top.shape[1]
    positions = bottom.shape[2] * bottom.shape[3]
    rows = []
    for b in range(batch):
        for i in range(c1):
            for j in range(c2):
                rows.append(sum(bottom[b, i].reshape(-1)[k] * top[b, j].reshape(-1)[k]
                                for k in range(positions)) / positions)
    return torch.stack(rows).reshape(batch, c1, c2)


def naive_fsp_loss(gs, gt):
    values = [(gs[b, i, j] - gt[b, i, j]) ** 2 for b in range(gs.shape[0]) for i in range(gs.shape[1])
              for j in range(gs.shape[2])]
    return sum(values) / len(values)


@pytest.mark.parametrize("bottom_shape, top_shape", [((2, 3, 2, 2), (2, 4, 2, 2)),
                                                     ((2, 2, 4, 4), (2, 3, 2, 2)),  # bottom pooled
                                                     ((2, 3, 2, 3), (2, 2, 4, 6))])  # top pooled, non-square
def test_fsp_matches_naive(bottom_shape, top_shape):
    s_bottom, s_top = _rand(bottom_shape, seed=4), _rand(top_shape, seed=5)
    t_bottom, t_top = _rand(bottom_shape, seed=6), _rand(top_shape, seed=7)
    teacher = naive_fsp_matrix(t_bottom, t_top)
    torch.testing.assert_close(fsp_matrix(s_bottom.float(), s_top.float()).double(),
                               naive_fsp_matrix(s_bottom, s_top), rtol=1e-5, atol=1e-6)
    assert_matches(lambda x: fsp_loss(fsp_matrix(x, s_top.float()), teacher.float()),
                   lambda x: naive_fsp_loss(naive_fsp_matrix(x, s_top), teacher), s_bottom)
    assert_matches(lambda x: fsp_loss(fsp_matrix(s_bottom.float(), x), teacher.float()),
                   lambda x: naive_fsp_loss(naive_fsp_matrix(s_bottom, x), teacher), s_top)


def test_fsp_hand_computed():
    # bottom: one channel (1, 3); top: channels (2, 0) and (1, 1); G = [(1·2 + 3·0)/2, (1·1 + 3·1)/2] = [1, 2]
    bottom = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    top = torch.tensor([[[[2.0, 0.0]], [[1.0, 1.0]]], [[[5.0, 5.0]], [[5.0, 5.0]]]])
    matrix = fsp_matrix(bottom, top)
    assert matrix.tolist() == [[[1.0, 2.0]], [[0.0, 0.0]]]
    # against a teacher matrix of ones: ((1 − 1)² + (2 − 1)² + 1 + 1) / 4
    assert fsp_loss(matrix, torch.ones(2, 1, 2)).item() == pytest.approx(0.75)


def test_fsp_checks_shapes():
    with pytest.raises(ValueError, match="fsp_loss: .*same shape \\(FSP matrices of layers with the same channel"):
        fsp_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"fsp_matrix: expected feature maps of shape \(B, C, H, W\)"):
        fsp_matrix(torch.zeros(2, 3), torch.zeros(2, 3, 1, 1))


# ------------------------------------------------------------------------------------------------------------- AB
def naive_ab(s, t, margin):
    total = 0.0
    flat_s, flat_t = s.reshape(-1), t.reshape(-1)
    for k in range(len(flat_s)):
        if flat_t[k] > 0 and flat_s[k] <= margin:
            total = total + (flat_s[k] - margin) ** 2
        elif flat_t[k] <= 0 and flat_s[k] > -margin:
            total = total + (flat_s[k] + margin) ** 2
    return total / s.shape[0]


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 3, 3)])
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_matches_naive(shape, margin):
    student, teacher = _rand(shape, seed=8, scale=1.5), _rand(shape, seed=9)
    teacher[0, 0] = 0.0  # t = 0 counts as inactive
    assert_matches(lambda x: ab_loss(x, teacher.float(), margin), lambda x: naive_ab(x, teacher, margin), student)


def test_ab_hand_computed():
    # margin 1; (s, t) -> penalty:
    #   sample 0: (0.5, −1) -> 1.5²; (−2, −1) -> 0; (0.5, 1) -> 0.5²           = 2.5
    #   sample 1: (2, 1) -> 0; (0, −1) -> 1²; (−0.5, 2) -> 1.5²                  = 3.25
    #   sum over elements / batch of 2
    s = torch.tensor([[0.5, -2.0, 0.5], [2.0, 0.0, -0.5]])
    t = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 2.0]])
    assert ab_loss(s, t).item() == pytest.approx(5.75 / 2)
    assert ab_loss(s, t, margin=0.0).item() == pytest.approx((0.25 + 0.0 + 0.25) / 2)


def test_ab_checks_shapes():
    with pytest.raises(ValueError, match="ab_loss: .*same shape \\(connect the student"):
        ab_loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 2, 2))


# ------------------------------------------------------------------------------------------------------------- FT
def naive_factor_map(f, exponent):
    """One sample (C, H, W) -> its normalised factor: channel mean of |f|^exponent per position, or all of f."""
    if exponent is None:
        values = list(f.reshape(-1))
    else:
        values = [sum(abs(f[c].reshape(-1)[j]) ** exponent for c in range(f.shape[0])) / f.shape[0]
                  for j in range(f[0].numel())]
    norm = torch.sqrt(sum(v**2 for v in values))
    return [v / norm for v in values]


def naive_ft(s, t, p, exponent):
    s, t = naive_common_size(s, t)
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        qs, qt = naive_factor_map(s[b], exponent), naive_factor_map(t[b], exponent)
        for j in range(len(qs)):
            total = total + abs(qs[j] - qt[j]) ** p
            count += 1
    return total / count


@pytest.mark.parametrize("shapes, exponent", [(((2, 3, 2, 2), (2, 5, 2, 2)), 2.0),
                                              (((2, 3, 4, 4), (2, 3, 2, 2)), 2.0),  # student pooled
                                              (((2, 3, 2, 3), (2, 3, 4, 6)), 1.0),  # teacher pooled
                                              (((2, 3, 2, 2), (2, 3, 2, 2)), None)])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ft_matches_naive(shapes, exponent, p):
    student, teacher = _rand(shapes[0], seed=10), _rand(shapes[1], seed=11)
    assert_matches(lambda x: ft_loss(x, teacher.float(), p, exponent), lambda x: naive_ft(x, teacher, p, exponent),
                   student)


def test_ft_hand_computed():
    # sample 0: Q_s = (1, 0) (channel mean of squares), Q_t = (1, 1)/√2 -> |1 − 1/√2| + 1/√2 = 1
    # sample 1: Q_s = Q_t = (0, 1) -> 0;  mean over 2 samples × 2 positions: 1/4
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 2.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]], [[[0.0, -3.0]], [[0.0, 3.0]]]])
    assert ft_loss(s, t).item() == pytest.approx(0.25, abs=1e-6)
    # whole normalised factors (the paper's form): (1, 0) against (0, 1) -> mean |±1| = 1
    assert ft_loss(torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]]), exponent=None).item() == 1.0


def test_ft_checks_shapes():
    with pytest.raises(ValueError, match="exponent=None the factors must have the same channels, got 3 and 4"):
        ft_loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 2, 2), exponent=None)


# ---------------------------------------------------------------------------------------------------------- common
def test_pool_to_common_size_pools_the_larger_map_only():
    big, small = _rand((2, 3, 4, 4), seed=12).float(), _rand((2, 5, 2, 2), seed=13).float()
    pooled, same = pool_to_common_size(big, small)
    assert same is small
    torch.testing.assert_close(pooled.double(), naive_block_pool(big.double(), 2, 2))
    same, pooled = pool_to_common_size(small, big)
    assert same is small and pooled.shape == (2, 3, 2, 2)


@pytest.mark.parametrize("loss", ["vid", "fsp", "ab", "ft"])
def test_losses_are_float32_scalars_from_low_precision_inputs(loss):
    s, t = _rand((2, 3, 2, 2), seed=14).bfloat16(), _rand((2, 3, 2, 2), seed=15).bfloat16()
    value = {"vid": lambda: vid_loss(s, t, torch.ones(3, dtype=torch.bfloat16)),
             "fsp": lambda: fsp_loss(fsp_matrix(s, t), fsp_matrix(t, s)),
             "ab": lambda: ab_loss(s, t),
             "ft": lambda: ft_loss(s, t)}[loss]()
    assert value.dtype == torch.float32 and value.shape == () and torch.isfinite(value)
    reference = {"vid": lambda: vid_loss(s.float(), t.float(), torch.ones(3)),
                 "fsp": lambda: fsp_loss(fsp_matrix(s.float(), t.float()), fsp_matrix(t.float(), s.float())),
                 "ab": lambda: ab_loss(s.float(), t.float()),
                 "ft": lambda: ft_loss(s.float(), t.float())}[loss]()
    torch.testing.assert_close(value, reference)


def test_ft_matches_its_reference_form_on_one_map():
    # the reference: F.normalize(f.pow(2).mean(1).view(B, -1)), then mean |difference|
    s, t = _rand((3, 4, 3, 3), seed=16).float(), _rand((3, 6, 3, 3), seed=17).float()
    reference = (F.normalize(s.pow(2).mean(1).view(3, -1)) - F.normalize(t.pow(2).mean(1).view(3, -1))).abs().mean()
    torch.testing.assert_close(ft_loss(s, t), reference)
