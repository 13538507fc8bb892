"""Tests for lightning_kd.losses.relation.

Each loss is checked against a deliberately naive float64 re-computation of
the paper's formula (explicit python loops over pairs and triplets of
samples), both for the value and for the gradient w.r.t. the student input,
plus a tiny case whose value is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_matches_naive, value_and_grad as _value_and_grad
from lightning_kd.losses import cc_loss, pkt_loss, rkd_loss, sp_loss

# (student shape, teacher shape): equal widths, different widths, feature maps
PAIRS = [
    ((2, 3), (2, 3)),
    ((5, 4), (5, 7)),
    ((6, 8), (6, 3)),
    ((4, 2, 3, 3), (4, 5, 2, 2)),
]


# --------------------------------------------------------------------------- #
# naive float64 references
# --------------------------------------------------------------------------- #
def _rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _rows(x):
    return [x[i].reshape(-1) for i in range(x.shape[0])]


def _norm(v):
    return torch.sqrt(sum(a**2 for a in v))


def naive_sp(s, t):
    def gram_rows(x):
        rows = _rows(x)
        g = [[torch.dot(a, b) for b in rows] for a in rows]
        return [[v / _norm(row) for v in row] for row in g]

    gs, gt = gram_rows(s), gram_rows(t)
    batch = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2


def naive_pkt(s, t, eps=1e-7):
    def cond_probs(x):
        rows = [r / (_norm(r) + eps) for r in _rows(x)]
        k = [[(torch.dot(a, b) + 1) / 2 for b in rows] for a in rows]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = cond_probs(s), cond_probs(t)
    batch = len(ps)
    total = sum(
        pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps))
        for i in range(batch)
        for j in range(batch)
    )
    return total / batch**2


def _huber(x):
    return 0.5 * x**2 if abs(x) < 1 else abs(x) - 0.5


def _naive_distances(x):
    rows = _rows(x)
    batch = len(rows)
    d = [[_norm(rows[i] - rows[j]) if i != j else None for j in range(batch)] for i in range(batch)]
    mean = sum(d[i][j] for i in range(batch) for j in range(batch) if i != j) / (batch * (batch - 1))
    return [[d[i][j] / mean if i != j else 0.0 for j in range(batch)] for i in range(batch)]


def _naive_angles(x):
    """cos of the angle at vertex i between j and k; 0 when j == i or k == i."""
    rows = _rows(x)
    batch = len(rows)
    out = {}
    for i in range(batch):
        for j in range(batch):
            for k in range(batch):
                if j == i or k == i:
                    out[i, j, k] = 0.0
                else:
                    u, v = rows[j] - rows[i], rows[k] - rows[i]
                    out[i, j, k] = torch.dot(u, v) / (_norm(u) * _norm(v))
    return out


def naive_rkd(s, t, w_d, w_a):
    batch = s.shape[0]
    ds, dt = _naive_distances(s), _naive_distances(t.detach())
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(batch) for j in range(batch)) / batch**2
    a_s, a_t = _naive_angles(s), _naive_angles(t.detach())
    loss_a = sum(_huber(a_s[key] - a_t[key]) for key in a_s) / batch**3
    return w_d * loss_d + w_a * loss_a


def naive_cc(s, t, gamma, p_order):
    def corr(x):
        rows = [r / _norm(r) for r in _rows(x)]
        coeffs = [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(p_order + 1)]
        return [[sum(c * torch.dot(a, b) ** p for p, c in enumerate(coeffs)) for b in rows] for a in rows]

    cs, ct = corr(s), corr(t)
    batch = len(cs)
    return sum((cs[i][j] - ct[i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2


# --------------------------------------------------------------------------- #
# comparison utilities
# --------------------------------------------------------------------------- #
def _assert_matches(fn_code, fn_naive, s64, rtol=1e-4, atol=1e-6):
    """Value and gradient with respect to the student input: float32 code vs the float64 naive form."""
    assert_matches_naive(fn_code, fn_naive, s64, rtol=rtol, atol=atol, grad_floor=1e-6)


def _random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_rand((dim, dim), seed=seed))
    return q.float()


# --------------------------------------------------------------------------- #
# SP
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", PAIRS)
def test_sp_matches_naive(shapes):
    s, t = _rand(shapes[0], seed=1), _rand(shapes[1], seed=2)
    _assert_matches(lambda x: sp_loss(x, t.float()), lambda x: naive_sp(x, t), s)


def test_sp_hand_computed():
    # student rows e1, e2 -> G_s = I (rows already unit)
    # teacher rows e1, e1 -> G = all ones -> rows (1, 1) / sqrt(2)
    # each row: (1 - 1/sqrt2)^2 + (1/sqrt2)^2 = 2 - sqrt(2); two rows; / B^2 = 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(s, t).item() == pytest.approx(2 * (2 - math.sqrt(2)) / 4, abs=1e-6)
    # feature maps are flattened per sample: the same rows as (B, 2, 1, 1) maps
    assert sp_loss(s.reshape(2, 2, 1, 1), t.reshape(2, 1, 2, 1)).item() == pytest.approx(
        2 * (2 - math.sqrt(2)) / 4, abs=1e-6
    )


def test_sp_zero_and_invariances():
    f = _rand((6, 10), seed=3).float()
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # a global scale or an orthogonal map of the features leaves G unchanged after row normalisation
    assert sp_loss(f, 5.0 * f @ _random_rotation(10, 4)).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- #
# PKT
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", PAIRS)
def test_pkt_matches_naive(shapes):
    s, t = _rand(shapes[0], seed=11), _rand(shapes[1], seed=12)
    _assert_matches(lambda x: pkt_loss(x, t.float()), lambda x: naive_pkt(x, t), s)


def test_pkt_hand_computed():
    # student rows e1, e2: cos = I -> K = (cos + 1) / 2 = [[1, 1/2], [1/2, 1]]
    #   -> p_s rows (2/3, 1/3), (1/3, 2/3)
    # teacher rows e1, e1: cos = 1 -> K = 1 -> p_t rows (1/2, 1/2)
    # row 0: 1/2 ln((1/2)/(2/3)) + 1/2 ln((1/2)/(1/3)) = 1/2 ln(3/4 * 3/2) = 1/2 ln(9/8); row 1 same
    # mean over the 4 entries: ln(9/8) / 4   (eps = 1e-7 moves it by < 1e-6)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(s, t).item() == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)


def test_pkt_zero_and_scale_invariance():
    f = _rand((6, 10), seed=13).float()
    assert pkt_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # each embedding is normalised on its own: per-sample positive scales do not matter
    scales = torch.rand(6, 1, generator=torch.Generator().manual_seed(14)) * 5 + 0.5
    assert pkt_loss(f, scales * f).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_zero_embedding_is_finite():
    s = _rand((4, 5), seed=15).float()
    s[1] = 0.0
    out, g = _value_and_grad(lambda x: pkt_loss(x, _rand((4, 3), seed=16).float()), s)
    assert torch.isfinite(out) and torch.isfinite(g).all()


# --------------------------------------------------------------------------- #
# RKD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", PAIRS)
@pytest.mark.parametrize("w_d,w_a", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_naive(shapes, w_d, w_a):
    # scale 3 pushes some differences past the smooth-L1 threshold of 1
    s, t = _rand(shapes[0], seed=21, scale=3.0), _rand(shapes[1], seed=22)
    if shapes[0][0] == 2:  # one pair: normalised distance 1 and cosine 1 on both sides
        assert rkd_loss(s.float(), t.float(), w_d, w_a).item() == pytest.approx(0.0, abs=1e-6)
        return
    _assert_matches(
        lambda x: rkd_loss(x, t.float(), w_d, w_a),
        lambda x: naive_rkd(x, t, w_d, w_a),
        s,
    )


def test_rkd_hand_computed():
    # student: (0,0), (1,0), (0,1); teacher: (0,0), (1,0), (2,0) (collinear)
    # distances (pairs 01, 02, 12): student (1, 1, sqrt2), mean (2 + sqrt2)/3
    #   -> normalised 3/(2+sqrt2) = 3 - 3 sqrt2/2 (twice) and 3 sqrt2/(2+sqrt2) = 3 sqrt2 - 3
    #   teacher (1, 2, 1), mean 4/3 -> (3/4, 3/2, 3/4)
    #   differences x01 = 9/4 - 3 sqrt2/2, x02 = 3/2 - 3 sqrt2/2, x12 = 3 sqrt2 - 15/4, all |x| < 1
    #   smooth-L1 0.5 x^2, each pair twice in the 3x3 matrix, mean over 9 entries
    r2 = math.sqrt(2)
    xs = [9 / 4 - 3 * r2 / 2, 3 / 2 - 3 * r2 / 2, 3 * r2 - 15 / 4]
    dist_loss = sum(2 * 0.5 * x**2 for x in xs) / 9
    # angles (cos at vertex i between the other two; j = k gives 1 on both sides):
    #   vertex 0: student 0 (right angle), teacher 1       -> |x| = 1  -> 0.5
    #   vertex 1: student sqrt2/2, teacher -1 (opposite)   -> x = 1 + sqrt2/2 -> x - 0.5
    #   vertex 2: student sqrt2/2, teacher 1               -> 0.5 (1 - sqrt2/2)^2
    #   each appears twice (j, k and k, j); sum = 2 (0.5 + 0.5 + sqrt2/2 + 0.75 - sqrt2/2) = 3.5
    #   mean over 27 triplets
    angle_loss = 3.5 / 27
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(dist_loss, abs=1e-6)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(angle_loss, abs=1e-6)
    assert rkd_loss(s, t).item() == pytest.approx(25 * dist_loss + 50 * angle_loss, abs=1e-5)


def test_rkd_large_difference_uses_linear_branch():
    # 1-d points: student evenly spaced 0, 1, 2, 3; teacher three near-coincident points and an
    # outlier at 100.  The teacher's mean pairwise distance is dominated by the outlier, so its
    # small distances normalise to ~0 while the student's are ~0.5: some gaps exceed 1 and the
    # smooth-L1 takes its linear branch |x| - 1/2 there.
    s = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [0.001], [0.002], [100.0]], dtype=torch.float64)
    dt = _naive_distances(t)
    ds = _naive_distances(s)
    assert max(abs(ds[i][j] - dt[i][j]) for i in range(4) for j in range(4)) > 1
    _assert_matches(
        lambda x: rkd_loss(x, t.float(), 1.0, 0.0), lambda x: naive_rkd(x, t, 1.0, 0.0), s
    )


def test_rkd_zero_invariances_and_teacher_without_gradient():
    f = _rand((6, 5), seed=23).float()
    assert rkd_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # distances (after normalisation by their mean) and angles are invariant to
    # scale, translation and rotation
    moved = 4.0 * f @ _random_rotation(5, 24) + torch.randn(1, 5, generator=torch.Generator().manual_seed(25))
    assert rkd_loss(f, moved).item() == pytest.approx(0.0, abs=1e-5)
    # teacher side is computed without gradient
    t = f.clone().requires_grad_(True)
    assert not rkd_loss(_rand((6, 3), seed=26).float(), t).requires_grad


def test_rkd_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(torch.rand(1, 4), torch.rand(1, 4))


def test_rkd_duplicate_student_points_are_finite():
    s = _rand((5, 4), seed=27).float()
    s[3] = s[1]
    out, g = _value_and_grad(lambda x: rkd_loss(x, _rand((5, 6), seed=28).float()), s)
    assert torch.isfinite(out) and torch.isfinite(g).all()


# --------------------------------------------------------------------------- #
# CC
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shapes", PAIRS)
@pytest.mark.parametrize("gamma,p_order", [(0.4, 2), (1.0, 3), (0.4, 0)])
def test_cc_matches_naive(shapes, gamma, p_order):
    s, t = _rand(shapes[0], seed=31), _rand(shapes[1], seed=32)
    if p_order == 0:  # the order-0 kernel is constant: no gradient to compare
        out = cc_loss(s.float(), t.float(), gamma, p_order)
        assert out.item() == pytest.approx(0.0, abs=1e-7)
        return
    _assert_matches(
        lambda x: cc_loss(x, t.float(), gamma, p_order),
        lambda x: naive_cc(x, t, gamma, p_order),
        s,
    )


def test_cc_hand_computed():
    # gamma = 0.4, P = 2: C(x) = e^-0.8 (1 + 0.8 x + 0.32 x^2) with x the cosine
    # student rows e1, e2: diagonal x = 1, off-diagonal x = 0 -> C = e^-0.8 * 2.12 / e^-0.8
    # teacher rows e1, e1: every x = 1 -> C = 2.12 e^-0.8 everywhere
    # diagonals agree; the two off-diagonal entries differ by 1.12 e^-0.8; mean over 4 entries
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = 2 * (1.12 * math.exp(-0.8)) ** 2 / 4
    assert cc_loss(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_cc_high_order_approaches_gaussian_rbf():
    # sum_p e^-2g (2g)^p / p! x^p -> exp(-2g (1 - x)) = exp(-g ||u - v||^2) for unit u, v
    s, t = _rand((5, 4), seed=33), _rand((5, 6), seed=34)

    def rbf(x):
        u = torch.nn.functional.normalize(x, dim=1)
        return torch.exp(-0.4 * torch.cdist(u, u).pow(2))

    exact = (rbf(s) - rbf(t)).pow(2).mean()
    assert cc_loss(s.float(), t.float(), 0.4, 12).item() == pytest.approx(exact.item(), rel=1e-5)


def test_cc_zero_when_equal_and_bad_order():
    f = _rand((6, 10), seed=35).float()
    assert cc_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        cc_loss(f, f, p_order=-1)


# --------------------------------------------------------------------------- #
# batch sizes, dtype under autocast
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [sp_loss, pkt_loss, rkd_loss, cc_loss])
def test_batch_size_mismatch_raises(fn):
    with pytest.raises(ValueError, match="batch"):
        fn(torch.rand(4, 8), torch.rand(5, 8))


@pytest.mark.parametrize("fn", [sp_loss, pkt_loss, rkd_loss, cc_loss])
def test_needs_batch_and_feature_dims(fn):
    with pytest.raises(ValueError):
        fn(torch.rand(4), torch.rand(4))


@pytest.mark.parametrize("fn", [sp_loss, pkt_loss, rkd_loss, cc_loss])
def test_float32_under_bf16_autocast(fn):
    s = _rand((6, 3, 2, 2), seed=41).to(torch.bfloat16)
    t = _rand((6, 20), seed=42).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(s, t)
    assert out.dtype == torch.float32
    assert out.shape == ()
    assert torch.isfinite(out)
