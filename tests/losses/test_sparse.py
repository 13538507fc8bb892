"""Sparse (top-k + tail) teacher divergences: a naive float64 loop over the k + 1 buckets, the dense losses at k = V
in value and gradient, hand-computed values, masking/shift/normalisation as the dense token loss, and errors."""

import doctest
import math

import pytest
import torch

import lightning_kd.losses.sparse
from lightning_kd.losses.sparse import (
    SPARSE_DIVERGENCES,
    TAIL_FLOOR,
    sparse_divergence_per_token,
    sparse_teacher,
    sparse_token_distillation_loss,
)
from lightning_kd.losses.token import token_distillation_loss


def naive_bucket_divergence(student, teacher, k, divergence, temperature=1.0, beta=0.5, skew=0.1):
    """One position: float64, plain Python over the vocabulary."""
    vocab = len(student)
    p = [math.exp(x / temperature) for x in teacher]
    q = [math.exp(x / temperature) for x in student]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    top = sorted(range(vocab), key=lambda v: -p[v])[:k]
    p_hat = [p[v] for v in top]
    q_hat = [q[v] for v in top]
    if k < vocab:
        p_hat.append(max(1.0 - sum(p_hat), TAIL_FLOOR))
        q_hat.append(sum(q[v] for v in range(vocab) if v not in top))

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    def mix(a, b, w):
        return [w * x + (1 - w) * y for x, y in zip(a, b)]

    if divergence == "forward_kl":
        return kl(p_hat, q_hat)
    if divergence == "reverse_kl":
        return kl(q_hat, p_hat)
    if divergence == "jsd":
        m = mix(p_hat, q_hat, beta)
        return beta * kl(p_hat, m) + (1 - beta) * kl(q_hat, m)
    if divergence == "skew_forward_kl":
        return kl(p_hat, mix(p_hat, q_hat, skew))
    if divergence == "skew_reverse_kl":
        return kl(q_hat, mix(p_hat, q_hat, 1 - skew))
    return 0.5 * sum(abs(x - y) for x, y in zip(p_hat, q_hat))


@pytest.mark.parametrize("divergence", SPARSE_DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_per_token_equals_a_naive_loop_over_the_buckets(divergence, k):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 6), 2 * torch.randn(4, 6)
    values, indices = sparse_teacher(teacher, k, temperature=1.5)
    got = sparse_divergence_per_token(student, values, indices, divergence, temperature=1.5, beta=0.3, skew=0.2)
    for row in range(4):
        expected = naive_bucket_divergence(student[row].tolist(), teacher[row].tolist(), k, divergence, 1.5, 0.3, 0.2)
        assert got[row].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("divergence", SPARSE_DIVERGENCES)
def test_k_equal_to_the_vocabulary_is_the_dense_loss_in_value_and_gradient(divergence):
    torch.manual_seed(1)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = 3 * torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 2] = -100
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 4] = 0
    options = dict(divergence=divergence, mask=mask, temperature=2.0, shift=True, beta=0.3,
                   scale_by_temperature_squared=True, num_valid_tokens=13)
    values, indices = sparse_teacher(teacher, 11, temperature=2.0)
    sparse = sparse_token_distillation_loss(student, values, indices, labels, **options)
    dense = token_distillation_loss(student, teacher, labels, **options)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-7)
    (grad_sparse,) = torch.autograd.grad(sparse, student)
    (grad_dense,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-4, atol=1e-7)


def test_hand_computed_values():
    # 3 tokens, k = 1: teacher (0.5, 0.25, 0.25) keeps token 0 and a tail of 0.5; uniform student: (1/3, 2/3)
    student = torch.zeros(1, 3)
    values, indices = sparse_teacher(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), 1)
    assert indices.tolist() == [[0]]
    forward = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    reverse = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    tvd = 0.5 * (abs(0.5 - 1 / 3) + abs(0.5 - 2 / 3))
    for name, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("tvd", tvd)):
        assert sparse_divergence_per_token(student, values, indices, name).item() == pytest.approx(expected, rel=1e-5)


def test_masking_shift_and_the_token_count_follow_the_dense_loss():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.tensor([[5, 1, -100, 3], [2, 2, 2, -100]])
    values, indices = sparse_teacher(teacher, 4)
    per_token = sparse_divergence_per_token(student[:, :-1], values[:, :-1], indices[:, :-1])
    valid = labels[:, 1:] != -100  # the prediction at t is scored on token t + 1
    expected = per_token[valid].sum() / valid.sum()
    got = sparse_token_distillation_loss(student, values, indices, labels, shift=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    global_count = sparse_token_distillation_loss(student, values, indices, labels, shift=True, num_valid_tokens=10)
    assert global_count.item() == pytest.approx(per_token[valid].sum().item() / 10, rel=1e-6)
    none_valid = sparse_token_distillation_loss(student, values, indices, torch.full_like(labels, -100), shift=True)
    assert none_valid.item() == 0.0


def test_float16_values_and_a_teacher_tail_rounded_to_zero_stay_finite():
    teacher = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # the top-1 token holds all but ~3e-13 of the mass
    values, indices = sparse_teacher(teacher, 1)
    student = torch.zeros(1, 4, requires_grad=True)
    loss = sparse_divergence_per_token(student, values.half(), indices.int(), "reverse_kl").sum()
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # the student's tail (3/4) against the floored teacher tail
    expected = 0.25 * math.log(0.25 / 1.0) + 0.75 * math.log(0.75 / TAIL_FLOOR)
    assert loss.item() == pytest.approx(expected, rel=1e-3)


def test_bad_input_names_the_problem():
    student = torch.zeros(2, 5)
    values, indices = sparse_teacher(torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="k=6 must be between 1"):
        sparse_teacher(torch.randn(2, 5), 6)
    with pytest.raises(ValueError, match="positions"):
        sparse_divergence_per_token(torch.zeros(3, 5), values, indices)
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_divergence_per_token(student, values, indices, "kl")
    with pytest.raises(ValueError, match="same shape"):
        sparse_divergence_per_token(student, values, indices[:, :1])


def test_docstring_examples_run():
    result = doctest.testmod(lightning_kd.losses.sparse)
    assert result.attempted > 0 and result.failed == 0
