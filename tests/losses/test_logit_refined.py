"""Tests for lightning_kd.losses.logit_refined.

Each loss is checked against a deliberately naive float64 re-computation of the
paper's formula with the official code's reductions (python loops over samples
and classes, built from scalar exp/log), for the value and for the gradient
w.r.t. the student logits, plus a tiny 2x3 case whose value is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_matches_naive, value_and_grad as _value_and_grad
from lightning_kd.losses import dkd_loss, kd_loss
from lightning_kd.losses.logit_refined import mlkd_loss, rld_loss, virtual_teacher_loss, virtual_teacher_probs

SHAPES = [(2, 3), (5, 7), (8, 10), (6, 20)]
LN = math.log


# --------------------------------------------------------------------------- #
# naive float64 references
# --------------------------------------------------------------------------- #
def _rand(b: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * scale


def _labels(b: int, c: int, seed: int) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def _softmax(values, temperature=1.0):
    """softmax(values / T) of a sequence of 0-d tensors, as a python list."""
    exps = [torch.exp(v / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    return sum(pj * torch.log(pj / qj) for pj, qj in zip(p, q) if float(pj) > 0)


def _median(values):
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def naive_rld(s, t, target, alpha, beta, temperature, confidence_temperature=None):
    tc = temperature if confidence_temperature is None else confidence_temperature
    batch, classes = s.shape
    total = 0.0
    for i in range(batch):
        y = int(target[i])
        row_s, row_t = [s[i, j] for j in range(classes)], [t[i, j] for j in range(classes)]
        # sample confidence: the student's label probability vs the teacher's top-1 probability
        p_s, p_t = _softmax(row_s, tc), _softmax(row_t, tc)
        top = max(range(classes), key=lambda j: float(t[i, j]))
        b_s = [p_s[y], sum(p_s[j] for j in range(classes) if j != y)]
        b_t = [p_t[top], sum(p_t[j] for j in range(classes) if j != top)]
        scd = _kl(b_t, b_s) * tc**2
        # masked correlation: only the classes the teacher ranks strictly below the label
        kept = [j for j in range(classes) if float(t[i, j]) < float(t[i, y])]
        mcd = 0.0
        if kept:
            q_s = _softmax([row_s[j] for j in kept], temperature)
            q_t = _softmax([row_t[j] for j in kept], temperature)
            mcd = _kl(q_t, q_s) * temperature**2
        total = total + alpha * scd + beta * mcd
    return total / batch


def naive_mlkd(s, t, temperatures, weights=(1.0, 1.0, 1.0)):
    batch, classes = s.shape
    w_instance, w_batch, w_class = weights
    teacher_probs = [_softmax([t[i, j] for j in range(classes)]) for i in range(batch)]
    confidence = [max(float(p) for p in row) for row in teacher_probs]
    sample_fraction = sum(c <= _median(confidence) for c in confidence) / batch
    class_totals = [sum(float(teacher_probs[i][j]) for i in range(batch)) for j in range(classes)]
    class_fraction = sum(c <= _median(class_totals) for c in class_totals) / classes
    instance = batch_term = class_term = 0.0
    for temp in temperatures:
        ps = [_softmax([s[i, j] for j in range(classes)], temp) for i in range(batch)]
        pt = [_softmax([t[i, j] for j in range(classes)], temp) for i in range(batch)]
        instance = instance + temp**2 * sum(_kl(pt[i], ps[i]) for i in range(batch)) / batch
        for a in range(batch):
            for b in range(batch):
                g_t = sum(pt[a][j] * pt[b][j] for j in range(classes))
                g_s = sum(ps[a][j] * ps[b][j] for j in range(classes))
                batch_term = batch_term + (g_t - g_s) ** 2 / batch
        for a in range(classes):
            for b in range(classes):
                m_t = sum(pt[i][a] * pt[i][b] for i in range(batch))
                m_s = sum(ps[i][a] * ps[i][b] for i in range(batch))
                class_term = class_term + (m_t - m_s) ** 2 / classes
    return (sample_fraction * (w_instance * instance + w_batch * batch_term)
            + class_fraction * w_class * class_term)


def naive_virtual(s, target, correct_prob, temperature):
    batch, classes = s.shape
    total = 0.0
    for i in range(batch):
        designed = [torch.tensor(correct_prob if j == int(target[i]) else (1 - correct_prob) / (classes - 1),
                                 dtype=torch.float64) for j in range(classes)]
        teacher = _softmax(designed, temperature)  # the official softening: the probabilities taken as logits
        student = _softmax([s[i, j] for j in range(classes)])
        total = total + _kl(teacher, student)
    return total / batch


# --------------------------------------------------------------------------- #
# comparison utilities
# --------------------------------------------------------------------------- #
def _assert_matches(fn_code, fn_naive, s64, rtol=1e-4, atol=1e-5):
    """Value and gradient with respect to the student input: float32 code vs the float64 naive form."""
    assert_matches_naive(fn_code, fn_naive, s64, rtol=rtol, atol=atol, grad_floor=1e-3)


# --------------------------------------------------------------------------- #
# RLD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,temperature,confidence_temperature",
                         [(1.0, 8.0, 4.0, None), (1.0, 1.0, 1.0, None), (0.5, 2.0, 2.0, 1.0)])
def test_rld_matches_naive(shape, alpha, beta, temperature, confidence_temperature):
    s, t = _rand(*shape, seed=51), _rand(*shape, seed=52)
    y = _labels(*shape, seed=53)
    _assert_matches(
        lambda x: rld_loss(x, t.float(), y, alpha, beta, temperature, confidence_temperature),
        lambda x: naive_rld(x, t, y, alpha, beta, temperature, confidence_temperature),
        s,
    )


def test_rld_hand_computed():
    # student uniform; teacher probabilities (1/6, 2/6, 3/6) in every row, T = 1
    # SCD, every row: student [p(y), rest] = [1/3, 2/3], teacher [top-1, rest] = [1/2, 1/2]
    #   -> 1/2 ln(3/2) + 1/2 ln(3/4)
    # MCD row 0, label 1 (teacher wrong): classes 1 and 2 rank >= the label -> only class 0 is left -> 0
    # MCD row 1, label 2 (teacher right): classes 0, 1 left; teacher (1/3, 2/3), student (1/2, 1/2)
    #   -> 1/3 ln(2/3) + 2/3 ln(4/3)
    scd = 0.5 * LN(1.5) + 0.5 * LN(0.75)
    mcd1 = LN(2 / 3) / 3 + 2 / 3 * LN(4 / 3)
    s = torch.zeros(2, 3)
    t = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    y = torch.tensor([1, 2])
    expected = 1.0 * scd + 8.0 * (0.0 + mcd1) / 2
    assert rld_loss(s, t, y, 1.0, 8.0, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 2 with doubled logits: identical distributions, times T^2 = 4
    assert rld_loss(s, 2 * t, y, 1.0, 8.0, 2.0).item() == pytest.approx(4 * expected, abs=1e-5)
    # a label the teacher ranks last leaves no class for MCD: that sample adds 0, not NaN
    out, grad = _value_and_grad(lambda x: rld_loss(x, t[:1], torch.tensor([0]), 0.0, 1.0, 1.0), s[:1])
    assert out.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_rld_equals_dkd_when_the_teacher_is_right():
    """With the teacher's top-1 on the label, SCD is DKD's TCKD and MCD is its NCKD."""
    s, t = _rand(6, 10, seed=54).float(), _rand(6, 10, seed=55).float()
    right = t.argmax(dim=1)
    torch.testing.assert_close(rld_loss(s, t, right, 1.0, 8.0, 4.0), dkd_loss(s, t, right, 1.0, 8.0, 4.0))
    wrong = (right + 1) % 10
    assert not torch.allclose(rld_loss(s, t, wrong, 1.0, 8.0, 4.0), dkd_loss(s, t, wrong, 1.0, 8.0, 4.0))


def test_rld_confidence_temperature_defaults_to_temperature():
    s, t, y = _rand(5, 7, seed=56).float(), _rand(5, 7, seed=57).float(), _labels(5, 7, seed=58)
    torch.testing.assert_close(rld_loss(s, t, y, temperature=3.0), rld_loss(s, t, y, temperature=3.0,
                                                                            confidence_temperature=3.0))
    assert not torch.allclose(rld_loss(s, t, y, temperature=3.0),
                              rld_loss(s, t, y, temperature=3.0, confidence_temperature=1.0))


def test_rld_confident_wrong_student_is_finite():
    s = torch.tensor([[-200.0, 200.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 1.0]])
    out, grad = _value_and_grad(lambda x: rld_loss(x, t, torch.tensor([0])), s)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_rld_rejects_a_wrong_number_of_labels():
    with pytest.raises(ValueError, match="labels"):
        rld_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- #
# MLKD
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperatures", [(2.0, 3.0, 4.0, 5.0, 6.0), (1.0,)])
def test_mlkd_matches_naive(shape, temperatures):
    s, t = _rand(*shape, seed=61), _rand(*shape, seed=62)
    _assert_matches(
        lambda x: mlkd_loss(x, t.float(), temperatures),
        lambda x: naive_mlkd(x, t, temperatures),
        s,
    )


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 2.0, 3.0)])
def test_mlkd_levels_match_naive(weights):
    s, t = _rand(7, 5, seed=63), _rand(7, 5, seed=64)
    _assert_matches(
        lambda x: mlkd_loss(x, t.float(), (2.0, 4.0), *weights),
        lambda x: naive_mlkd(x, t, (2.0, 4.0), weights),
        s,
    )


def test_mlkd_hand_computed():
    # student uniform (1/3 each); teacher row 0 (1/2, 1/4, 1/4), row 1 uniform; T = 1
    # sample mask: confidences (1/2, 1/3), median 5/12 -> keeps row 1 -> f_B = 1/2
    # class mask: class totals (5/6, 7/12, 7/12), median 7/12 -> keeps classes 1, 2 -> f_C = 2/3
    # instance: row 0 KL = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8), row 1 0 -> mean 1/4 ln(9/8)
    # batch: teacher Gram [[3/8, 1/3], [1/3, 1/3]], student all 1/3 -> (1/24)^2 / B = 1/1152
    # class: teacher P'P (in 1/144) [[52, 34, 34], [34, 25, 25], [34, 25, 25]], student all 32
    #   -> (20^2 + 4 * 2^2 + 4 * 7^2) / 144^2 / C = 612 / 20736 / 3 = 17 / 1728
    instance, batch, klass = LN(9 / 8) / 4, 1 / 1152, 17 / 1728
    s = torch.zeros(2, 3)
    t = torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    expected = 0.5 * (instance + batch) + 2 / 3 * klass
    assert mlkd_loss(s, t, (1.0,)).item() == pytest.approx(expected, abs=1e-6)
    assert mlkd_loss(s, t, (1.0,), 1.0, 0.0, 0.0).item() == pytest.approx(0.5 * instance, abs=1e-6)
    assert mlkd_loss(s, t, (1.0,), 0.0, 1.0, 0.0).item() == pytest.approx(0.5 * batch, abs=1e-7)
    assert mlkd_loss(s, t, (1.0,), 0.0, 0.0, 1.0).item() == pytest.approx(2 / 3 * klass, abs=1e-7)


def test_mlkd_instance_level_is_kd_summed_over_temperatures_times_the_kept_fraction():
    s, t = _rand(9, 6, seed=65).float(), _rand(9, 6, seed=66).float()  # odd batch: 5 of 9 at most the median
    temperatures = (2.0, 3.0, 4.0, 5.0, 6.0)
    expected = 5 / 9 * sum(kd_loss(s, t, temperature) for temperature in temperatures)
    torch.testing.assert_close(mlkd_loss(s, t, temperatures, 1.0, 0.0, 0.0), expected)


def test_mlkd_is_zero_for_equal_logits_and_rejects_bad_temperatures():
    z = _rand(6, 8, seed=67).float()
    assert mlkd_loss(z, z.clone()).abs().item() < 1e-6
    for bad in [(), (2.0, 0.0)]:
        with pytest.raises(ValueError, match="temperatures"):
            mlkd_loss(z, z, bad)


# --------------------------------------------------------------------------- #
# Teacher-free KD: the virtual teacher
# --------------------------------------------------------------------------- #
def test_virtual_teacher_probs_hand_computed():
    # a = 0.9 on the label, (1 - 0.9) / (3 - 1) = 0.05 on each of the two other classes
    got = virtual_teacher_probs(torch.tensor([0, 2]), 3, correct_prob=0.9)
    expected = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32
    torch.testing.assert_close(virtual_teacher_probs(torch.tensor([1]), 5).sum(dim=1), torch.ones(1))
    assert virtual_teacher_probs(torch.tensor([1]), 5)[0, 1].item() == pytest.approx(0.99)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("correct_prob,temperature", [(0.99, 20.0), (0.9, 1.0), (0.9, 4.0)])
def test_virtual_teacher_loss_matches_naive(shape, correct_prob, temperature):
    s, y = _rand(*shape, seed=71), _labels(*shape, seed=72)
    _assert_matches(
        lambda x: virtual_teacher_loss(x, y, correct_prob, temperature),
        lambda x: naive_virtual(x, y, correct_prob, temperature),
        s,
    )


def test_virtual_teacher_loss_hand_computed():
    # teacher softmax(p_d / 1) with p_d = (0.9, 0.05, 0.05): q = (e^0.9, e^0.05, e^0.05) / (e^0.9 + 2 e^0.05);
    # student uniform -> KL = sum_k q_k ln(3 q_k); row 1 (label 2) is the same permuted
    z = math.exp(0.9) + 2 * math.exp(0.05)
    q = [math.exp(0.9) / z, math.exp(0.05) / z, math.exp(0.05) / z]
    kl = sum(qk * LN(3 * qk) for qk in q)
    got = virtual_teacher_loss(torch.zeros(2, 3), torch.tensor([0, 2]), correct_prob=0.9, temperature=1.0)
    assert got.item() == pytest.approx(kl, abs=1e-6)
    # a high temperature flattens the designed teacher towards uniform: the loss of a uniform student vanishes
    assert virtual_teacher_loss(torch.zeros(2, 3), torch.tensor([0, 2]), 0.9, 1e4).item() < 1e-6


def test_virtual_teacher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="correct_prob"):
        virtual_teacher_probs(torch.tensor([0]), 3, correct_prob=1.5)
    with pytest.raises(ValueError, match="2 classes"):
        virtual_teacher_probs(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="temperature"):
        virtual_teacher_loss(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=0.0)


# --------------------------------------------------------------------------- #
# dense outputs: per pixel (B, C, H, W) and per token (B, T, V)
# --------------------------------------------------------------------------- #
# 12 pixels of 4 classes; 6 tokens of a 5-word vocabulary
DENSE_SHAPES = {"pixels": (2, 4, 2, 3), "tokens": (2, 3, 5)}
IGNORE = -100


def _dense(kind: str, seed: int) -> torch.Tensor:
    return torch.randn(*DENSE_SHAPES[kind], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def _classes(kind: str) -> int:
    return DENSE_SHAPES[kind][1] if kind == "pixels" else DENSE_SHAPES[kind][2]


def _position_shape(kind: str) -> tuple:
    b, c, *rest = DENSE_SHAPES[kind]
    return (b, *rest) if kind == "pixels" else (b, c)


def _position_indices(kind: str) -> list:
    shape = _position_shape(kind)
    if kind == "pixels":
        return [(b, h, w) for b in range(shape[0]) for h in range(shape[1]) for w in range(shape[2])]
    return [(b, i) for b in range(shape[0]) for i in range(shape[1])]


def _row(x: torch.Tensor, kind: str, index: tuple) -> torch.Tensor:
    """The logits of one position as a (1, C) matrix."""
    return (x[index[0], :, index[1], index[2]] if kind == "pixels" else x[index[0], index[1], :]).unsqueeze(0)


def _selection(kind, how, seed):
    """(kwargs, labels, valid positions): a random mask, IGNORE labels, or both (first position kept, last left out)."""
    g = torch.Generator().manual_seed(seed)
    shape = _position_shape(kind)
    labels = torch.randint(0, _classes(kind), shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.6
    drop = torch.rand(shape, generator=g) < 0.35
    mask.view(-1)[0], mask.view(-1)[-1], drop.view(-1)[0], drop.view(-1)[-1] = True, False, False, True
    if how == "mask":
        return {"mask": mask}, labels, mask
    labels = labels.masked_fill(drop, IGNORE)
    if how == "ignore_index":
        return {}, labels, labels != IGNORE
    return {"mask": mask}, labels, mask & (labels != IGNORE)


def naive_dense(kind, valid, per_position):
    total, count = 0.0, 0
    for index in _position_indices(kind):
        if bool(valid[index]):
            total = total + per_position(index)
            count += 1
    return total / count


def _valid_rows(x, kind, valid):
    return torch.cat([_row(x, kind, index) for index in _position_indices(kind) if bool(valid[index])])


DENSE_LOSSES = {
    "rld": (
        lambda s, t, y, **kw: rld_loss(s, t, y, 1.0, 2.0, 2.0, 1.0, **kw),
        lambda s, t, y: naive_rld(s, t, [y], 1.0, 2.0, 2.0, 1.0),
    ),
    "virtual": (
        lambda s, t, y, **kw: virtual_teacher_loss(s, y, 0.9, 4.0, **kw),
        lambda s, t, y: naive_virtual(s, [y], 0.9, 4.0),
    ),
}


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("how", ["mask", "ignore_index", "both"])
@pytest.mark.parametrize("name", list(DENSE_LOSSES))
def test_dense_matches_naive_loop(name, how, kind):
    loss, naive = DENSE_LOSSES[name]
    s, t = _dense(kind, seed=201), _dense(kind, seed=202)
    kwargs, labels, valid = _selection(kind, how, seed=203)
    assert 0 < int(valid.sum()) < valid.numel()
    _assert_matches(
        lambda x: loss(x, t.float(), labels, **kwargs),
        lambda x: naive_dense(kind, valid, lambda i: naive(_row(x, kind, i), _row(t, kind, i), labels[i])),
        s,
    )


@pytest.mark.parametrize("kind", list(DENSE_SHAPES))
@pytest.mark.parametrize("name", list(DENSE_LOSSES))
def test_dense_equals_the_flattened_call_and_a_batch_is_one_position_each(name, kind):
    loss = DENSE_LOSSES[name][0]
    s, t = _dense(kind, seed=211).float(), _dense(kind, seed=212).float()
    kwargs, labels, valid = _selection(kind, "both", seed=213)
    expected = loss(_valid_rows(s, kind, valid), _valid_rows(t, kind, valid), labels[valid])
    torch.testing.assert_close(loss(s, t, labels, **kwargs), expected, rtol=1e-5, atol=1e-6)
    # (B, C) keeps its batch mean: identical to (B, C, 1, 1) pixels and (B, 1, C) tokens
    s2, t2, y2 = _rand(5, 7, seed=214).float(), _rand(5, 7, seed=215).float(), _labels(5, 7, seed=216)
    out = loss(s2, t2, y2)
    assert torch.equal(loss(s2[:, :, None, None], t2[:, :, None, None], y2[:, None, None]), out)
    assert torch.equal(loss(s2[:, None, :], t2[:, None, :], y2[:, None]), out)


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
def test_dense_left_out_positions_nan_padding_and_nothing_valid(name):
    loss = DENSE_LOSSES[name][0]
    s, t = _dense("tokens", seed=221).float(), _dense("tokens", seed=222).float()
    kwargs, labels, valid = _selection("tokens", "both", seed=223)
    left_out = (~valid).unsqueeze(-1).expand_as(s)
    out, grad = _value_and_grad(lambda x: loss(x, t, labels, **kwargs), s)
    bad_out, bad_grad = _value_and_grad(
        lambda x: loss(x, t.masked_fill(left_out, math.inf), labels, **kwargs), s.masked_fill(left_out, math.nan))
    torch.testing.assert_close(bad_out, out)
    torch.testing.assert_close(bad_grad, grad)
    # every position left out: 0 with zero gradients
    nothing = torch.zeros_like(valid)
    out, grad = _value_and_grad(lambda x: loss(x, t, labels, mask=nothing), s)
    assert out.dtype == torch.float32 and out.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    out = loss(s, t, torch.full_like(labels, IGNORE))
    assert out.item() == 0.0


def test_dense_rld_hand_computed():
    # the two rows of test_rld_hand_computed as tokens of one sequence, plus a third token labelled IGNORE
    scd = 0.5 * LN(1.5) + 0.5 * LN(0.75)
    mcd1 = LN(2 / 3) / 3 + 2 / 3 * LN(4 / 3)
    s = torch.zeros(1, 3, 3)
    t = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [9.0, 1.0, 1.0]]]))
    got = rld_loss(s, t, torch.tensor([[1, 2, IGNORE]]), 1.0, 8.0, 1.0)
    assert got.item() == pytest.approx(1.0 * scd + 8.0 * (0.0 + mcd1) / 2, abs=1e-6)
    # the virtual teacher on two pixels, one of them masked out: the loss of the other (test above)
    z = math.exp(0.9) + 2 * math.exp(0.05)
    kl = sum(qk * LN(3 * qk) for qk in (math.exp(0.9) / z, math.exp(0.05) / z, math.exp(0.05) / z))
    got = virtual_teacher_loss(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 1]]]), 0.9, 1.0,
                               mask=torch.tensor([[[True, False]]]))
    assert got.item() == pytest.approx(kl, abs=1e-6)


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
def test_dense_bf16_inputs_give_float32(name):
    loss = DENSE_LOSSES[name][0]
    s, t = _dense("pixels", seed=231).bfloat16(), _dense("pixels", seed=232).bfloat16()
    kwargs, labels, _ = _selection("pixels", "both", seed=233)
    out = loss(s, t, labels, **kwargs)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, loss(s.float(), t.float(), labels, **kwargs), rtol=1e-6, atol=1e-6)


def test_dense_bad_arguments():
    s, y = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mlkd_loss takes \\(B, C\\) logits only"):
        mlkd_loss(s, s)
    with pytest.raises(ValueError, match="target must have the shape"):
        rld_loss(s, s, y[:, :2])
    with pytest.raises(ValueError, match="boolean"):
        virtual_teacher_loss(s, y, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="2 classes"):
        rld_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), y)


# --------------------------------------------------------------------------- #
# all losses
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("loss", [
    lambda s, t, y: rld_loss(s, t, y),
    lambda s, t, y: mlkd_loss(s, t),
    lambda s, t, y: virtual_teacher_loss(s, y),
], ids=["rld", "mlkd", "virtual"])
def test_float32_under_bf16_autocast(loss):
    s, t, y = _rand(4, 10, seed=81).float(), _rand(4, 10, seed=82).float(), _labels(4, 10, seed=83)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(s.bfloat16(), t.bfloat16(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(s.bfloat16().float(), t.bfloat16().float(), y))
