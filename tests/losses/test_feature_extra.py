"""Tests for lightning_kd.losses.feature_extra: every loss against a naive float64 re-computation of its formula
(value and gradient, explicit loops) and against a value worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_matches_naive
from lightning_kd.losses.feature_extra import ab_loss, fsp_loss, fsp_matrix, ft_loss, pool_to_common_size, vid_loss


def _rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


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
