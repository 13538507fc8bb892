"""Tests for lightning_kd.losses.contrastive.

The scores, the NCE loss and the CRD objective are checked against a naive float64 re-computation written the
reference's way (memory rows gathered per anchor, explicit loops over anchors and negatives), for the value and the
gradient w.r.t. the embeddings, plus a 2×3 case worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses import contrast_scores, crd_loss, nce_loss, nce_normalizer


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)


def naive_scores(anchors, memory, contrast_index, temperature):
    return torch.stack([torch.stack([torch.exp(torch.dot(memory[j], anchors[b]) / temperature)
                                     for j in contrast_index[b].tolist()]) for b in range(len(anchors))])


def naive_nce(probabilities, num_samples, eps=1e-7):
    k = probabilities.shape[1] - 1
    noise = k / num_samples
    total = 0.0
    for row in probabilities:
        total = total + torch.log(row[0] / (row[0] + noise + eps))
        for p in row[1:]:
            total = total + torch.log(noise / (p + noise + eps))
    return -total / probabilities.shape[0]


def problem(batch=3, dim=4, num_samples=9, num_negatives=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = unit_rows(batch, dim, seed + 1), unit_rows(batch, dim, seed + 2)
    student_memory, teacher_memory = unit_rows(num_samples, dim, seed + 3), unit_rows(num_samples, dim, seed + 4)
    index = torch.randperm(num_samples, generator=generator)[:batch]
    negatives = torch.randint(0, num_samples, (batch, num_negatives), generator=generator)
    return student, teacher, student_memory, teacher_memory, torch.cat([index[:, None], negatives], 1)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_scores_are_the_naive_scores(temperature):
    anchors, _, memory, _, contrast_index = problem()
    anchors.requires_grad_(True)
    scores = contrast_scores(anchors.float(), memory.float(), contrast_index, temperature)
    assert scores.dtype == torch.float32 and scores.shape == (3, 6)
    assert torch.allclose(scores.double(), naive_scores(anchors, memory, contrast_index, temperature), rtol=1e-5)


def test_nce_loss_by_hand_on_two_by_three():
    # K = 2 negatives, N = 4 samples: noise K/N = 0.5
    p = torch.tensor([[0.5, 0.25, 1.0], [2.0, 0.5, 0.0]])
    by_hand = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.75) + math.log(0.5 / 1.5)
                + math.log(2.0 / 2.5) + math.log(0.5 / 1.0) + math.log(0.5 / 0.5)) / 2
    assert nce_loss(p, num_samples=4).item() == pytest.approx(by_hand, rel=1e-5)


def test_nce_loss_is_the_naive_loss_with_its_gradient():
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(4, 7, generator=generator, dtype=torch.float64).mul(3).requires_grad_(True)
    loss = nce_loss(p, num_samples=50)
    expected = naive_nce(p, 50)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, p)
    (expected_grad,) = torch.autograd.grad(expected, p)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_normalizer_is_n_times_the_mean_score():
    scores = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert nce_normalizer(scores, 10).item() == pytest.approx(30.0)
    assert not nce_normalizer(scores.requires_grad_(True), 10).requires_grad


def test_crd_loss_is_both_directions_of_the_naive_nce():
    student, teacher, student_memory, teacher_memory, contrast_index = problem()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    normalizers = (torch.tensor(7.5), 11.0)
    loss = crd_loss(student.float(), teacher.float(), student_memory.float(), teacher_memory.float(), contrast_index,
                    normalizers, temperature=0.07)
    expected = (naive_nce(naive_scores(student, teacher_memory, contrast_index, 0.07) / 7.5, 9)
                + naive_nce(naive_scores(teacher, student_memory, contrast_index, 0.07) / 11.0, 9))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.allclose(loss.double(), expected, rtol=1e-4)
    grads = torch.autograd.grad(loss, [student, teacher])
    expected_grads = torch.autograd.grad(expected, [student, teacher])
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad.double(), expected_grad, rtol=1e-3, atol=1e-5)


def test_crd_loss_prefers_matching_memories():
    student, _, _, _, contrast_index = problem(num_samples=9)
    memory = unit_rows(9, 4, 10)
    memory[contrast_index[:, 0]] = student  # each sample's own row holds its embedding
    matched = crd_loss(student, student, memory, memory, contrast_index, (1.0, 1.0))
    shuffled = crd_loss(student, student, memory.roll(1, 0), memory.roll(1, 0), contrast_index, (1.0, 1.0))
    assert matched < shuffled


def test_scores_stay_float32_under_low_precision_autocast():
    student, teacher, student_memory, teacher_memory, contrast_index = problem()
    args = (student.float(), teacher.float(), student_memory.float(), teacher_memory.float(), contrast_index,
            (5.0, 5.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crd_loss(*args)
    assert low.dtype == torch.float32 and torch.allclose(low, crd_loss(*args))


def test_shape_errors_name_the_expected_shapes():
    anchors, _, memory, _, contrast_index = problem()
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        contrast_scores(anchors, memory[:, :3], contrast_index, 0.07)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ K\)"):
        contrast_scores(anchors, memory, contrast_index[:2], 0.07)
    with pytest.raises(ValueError, match="K >= 1"):
        nce_loss(torch.ones(2, 1), 10)
