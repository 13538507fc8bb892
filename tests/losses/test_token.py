"""Tests for lightning_kd.losses.token.

Every divergence is checked against a naive float64 re-computation (python loops over positions and vocabulary
entries, scalar exp/log), value and gradient, plus hand-computed values on a two-token example and the identities
at the ends of beta / skew.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses.token import (
    divergence_per_token,
    forward_kl_loss,
    generalized_jsd_loss,
    generalized_jsd_per_token,
    global_token_count,
    reverse_kl_loss,
    skew_forward_kl_loss,
    skew_forward_kl_per_token,
    skew_reverse_kl_loss,
    skew_reverse_kl_per_token,
    token_distillation_loss,
    total_variation_loss,
    forward_kl_per_token,
    reverse_kl_per_token,
)


# --------------------------------------------------------------------------- #
# naive float64 references
# --------------------------------------------------------------------------- #
def _softmax(row, temperature):
    exps = [torch.exp(row[v] / temperature) for v in range(len(row))]
    z = sum(exps)
    return [e / z for e in exps]


def _kl(a, b):
    return sum(a_v * torch.log(a_v / b_v) for a_v, b_v in zip(a, b))


def _naive_divergence(name, p, q, beta=0.5, skew=0.1):
    """p: teacher, q: student (lists of 0-d float64 tensors)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        m = [beta * p_v + (1 - beta) * q_v for p_v, q_v in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_forward_kl":
        return _kl(p, [skew * p_v + (1 - skew) * q_v for p_v, q_v in zip(p, q)])
    if name == "skew_reverse_kl":
        return _kl(q, [(1 - skew) * p_v + skew * q_v for p_v, q_v in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(torch.abs(p_v - q_v) for p_v, q_v in zip(p, q))
    raise AssertionError(name)


def naive_loss(student, teacher, name, valid, temperature=1.0, scale=False, beta=0.5, skew=0.1):
    """student/teacher: (B, T, V) float64; valid: (B, T) list of bools. Sum over valid tokens / their count."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not valid[b][t]:
                continue
            p = _softmax(teacher[b, t], temperature)
            q = _softmax(student[b, t], temperature)
            total = total + _naive_divergence(name, p, q, beta, skew)
            count += 1
    factor = temperature**2 if scale else 1.0
    return total * factor / max(count, 1)


def _rand(*shape, seed, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_forward_kl", {"skew": 0.5}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.5}),
    ("tvd", {}),
]


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("temperature,scale", [(1.0, False), (2.0, True), (0.5, False)])
def test_matches_naive_value_and_grad(name, params, temperature, scale):
    student, teacher = _rand(2, 3, 5, seed=0), _rand(2, 3, 5, seed=1)
    labels = torch.tensor([[4, -100, 0], [1, 2, -100]])
    valid = (labels != -100).tolist()

    out_student = student.float().requires_grad_(True)
    out = token_distillation_loss(out_student, teacher.float(), labels, divergence=name, temperature=temperature,
                                  scale_by_temperature_squared=scale, **params)
    (grad,) = torch.autograd.grad(out, out_student)

    ref_student = student.clone().requires_grad_(True)
    ref = naive_loss(ref_student, teacher, name, valid, temperature, scale, **params)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)

    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * max(ref_grad.abs().max().item(), 1e-3))
    assert grad[0, 1].abs().max() == 0 and grad[1, 2].abs().max() == 0  # masked positions get no gradient
    assert grad.abs().sum() > 0


def test_two_token_hand_computed():
    # student uniform on both tokens; teacher (1/2, 1/2) on the first, (3/4, 1/4) on the second
    student = torch.zeros(1, 2, 2)
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.75, 0.25]]]))
    fkl_2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
    rkl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841
    assert forward_kl_loss(student, teacher).item() == pytest.approx(fkl_2 / 2, abs=1e-6)
    assert reverse_kl_loss(student, teacher).item() == pytest.approx(rkl_2 / 2, abs=1e-6)
    assert total_variation_loss(student, teacher).item() == pytest.approx(0.25 / 2, abs=1e-6)
    # JSD(1/2): m = (5/8, 3/8); 1/2 KL(p||m) + 1/2 KL(q||m)
    kl_pm = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_qm = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    assert generalized_jsd_loss(student, teacher, beta=0.5).item() == pytest.approx(
        (0.5 * kl_pm + 0.5 * kl_qm) / 2, abs=1e-6)
    # SKL(0.1): m = 0.1 p + 0.9 q = (0.525, 0.475)
    skl = 0.75 * math.log(0.75 / 0.525) + 0.25 * math.log(0.25 / 0.475)
    assert skew_forward_kl_loss(student, teacher, skew=0.1).item() == pytest.approx(skl / 2, abs=1e-6)
    # SRKL(0.1): m = 0.9 p + 0.1 q = (0.725, 0.275)
    srkl = 0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.5 / 0.275)
    assert skew_reverse_kl_loss(student, teacher, skew=0.1).item() == pytest.approx(srkl / 2, abs=1e-6)
    # only the second token counts
    assert forward_kl_loss(student, teacher, torch.tensor([[-100, 1]])).item() == pytest.approx(fkl_2, abs=1e-6)
    # shift: the logits at position 0 predict token 1, so only the first position's logits are used
    assert forward_kl_loss(student, teacher, shift=True).item() == pytest.approx(0.0, abs=1e-7)
    assert forward_kl_loss(student.flip(1), teacher.flip(1), shift=True).item() == pytest.approx(fkl_2, abs=1e-6)


def test_beta_and_skew_end_points():
    student, teacher = _rand(3, 4, 7, seed=2).float(), _rand(3, 4, 7, seed=3).float()
    fkl, rkl = forward_kl_per_token(student, teacher), reverse_kl_per_token(student, teacher)
    assert torch.equal(generalized_jsd_per_token(student, teacher, beta=0.0), fkl)
    assert torch.equal(generalized_jsd_per_token(student, teacher, beta=1.0), rkl)
    assert torch.equal(skew_forward_kl_per_token(student, teacher, skew=0.0), fkl)
    assert torch.equal(skew_reverse_kl_per_token(student, teacher, skew=0.0), rkl)
    zeros = torch.zeros_like(fkl)
    assert torch.equal(skew_forward_kl_per_token(student, teacher, skew=1.0), zeros)
    assert torch.equal(skew_reverse_kl_per_token(student, teacher, skew=1.0), zeros)
    # JSD(beta) vanishes towards the ends; JSD / (beta (1 - beta)) tends to the two KLs
    assert generalized_jsd_per_token(student, teacher, beta=1e-3).abs().max() < 1e-2 * fkl.max()
    for end, kl in ((0.0, fkl), (1.0, rkl)):
        errors = [(generalized_jsd_per_token(student, teacher, beta=abs(end - d), normalize=True) - kl).abs().max()
                  for d in (1e-2, 1e-4)]
        assert errors[1] < 0.05 * errors[0] and errors[1] < 0.01 * kl.max()  # converges linearly in the distance
    # the ordinary JSD is symmetric in student and teacher
    torch.testing.assert_close(generalized_jsd_per_token(student, teacher), generalized_jsd_per_token(teacher, student))


def test_mask_and_labels_select_the_same_tokens():
    student, teacher = _rand(2, 5, 6, seed=4).float(), _rand(2, 5, 6, seed=5).float()
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.where(attention.bool(), torch.randint(0, 6, (2, 5)), torch.tensor(-100))
    by_mask = reverse_kl_loss(student, teacher, mask=attention)
    assert torch.equal(by_mask, reverse_kl_loss(student, teacher, labels))
    assert torch.equal(by_mask, reverse_kl_loss(student, teacher, labels, mask=attention))
    # logits at masked positions do not matter
    garbage = student.clone()
    garbage[0, 3:] = 1e4
    assert torch.equal(by_mask, reverse_kl_loss(garbage, teacher, mask=attention))


def test_shift_equals_manual_slicing():
    student, teacher = _rand(2, 6, 5, seed=6).float(), _rand(2, 6, 5, seed=7).float()
    labels = torch.tensor([[3, 1, 4, 1, -100, -100], [-100, 2, 6 - 1, 3, 5 - 1, 0]])
    shifted = skew_reverse_kl_loss(student, teacher, labels, shift=True)
    manual = skew_reverse_kl_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:])
    assert torch.equal(shifted, manual)
    flat = skew_reverse_kl_loss(student[:, :-1].reshape(-1, 5), teacher[:, :-1].reshape(-1, 5),
                                labels[:, 1:].reshape(-1))
    torch.testing.assert_close(flat, manual)


def test_temperature_scaling():
    student, teacher = _rand(2, 3, 4, seed=8).float(), _rand(2, 3, 4, seed=9).float()
    plain = forward_kl_loss(student / 3.0, teacher / 3.0)
    assert torch.equal(forward_kl_loss(student, teacher, temperature=3.0), plain)
    torch.testing.assert_close(forward_kl_loss(student, teacher, temperature=3.0, scale_by_temperature_squared=True),
                               9.0 * plain)


def test_global_token_count_normalisation_over_micro_batches():
    student, teacher = _rand(4, 5, 6, seed=10).float(), _rand(4, 5, 6, seed=11).float()
    labels = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 2:] = -100  # first micro-batch: 2 + 5 valid tokens, second: 5 + 1
    labels[3, 1:] = -100
    first, second = slice(0, 2), slice(2, 4)
    count = global_token_count(labels[first] != -100) + global_token_count(labels[second] != -100)
    assert count.item() == 13 and count.dtype == torch.float32
    for loss_fn in (forward_kl_loss, generalized_jsd_loss, total_variation_loss):
        whole = loss_fn(student, teacher, labels)
        accumulated = (loss_fn(student[first], teacher[first], labels[first], num_valid_tokens=count)
                       + loss_fn(student[second], teacher[second], labels[second], num_valid_tokens=count))
        torch.testing.assert_close(accumulated, whole)
        # the local means (default normalisation) weigh the tokens of the two micro-batches differently
        local = (loss_fn(student[first], teacher[first], labels[first])
                 + loss_fn(student[second], teacher[second], labels[second])) / 2
        assert not torch.allclose(local, whole)


def test_flat_inputs_and_low_precision():
    student, teacher = _rand(7, 9, seed=12).float(), _rand(7, 9, seed=13).float()
    full = total_variation_loss(student, teacher)
    manual = 0.5 * (student.softmax(-1) - teacher.softmax(-1)).abs().sum(-1).mean()
    torch.testing.assert_close(full, manual)
    low = forward_kl_loss(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, forward_kl_loss(student.bfloat16().float(), teacher.bfloat16().float()))


def test_no_valid_token_gives_zero_and_masked_vocabulary_is_finite():
    student, teacher = _rand(1, 3, 4, seed=14).float(), _rand(1, 3, 4, seed=15).float()
    assert forward_kl_loss(student, teacher, torch.full((1, 3), -100)).item() == 0.0
    teacher[..., -1] = float("-inf")  # an entry the teacher never predicts
    student = student.requires_grad_(True)
    for name, _ in CASES:
        loss = token_distillation_loss(student, teacher, divergence=name)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


def test_bad_inputs_name_the_problem():
    s, t = torch.zeros(2, 3, 5), torch.zeros(2, 3, 6)
    with pytest.raises(ValueError, match="vocabularies differ"):
        forward_kl_loss(s, t)
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd_loss(s, s, beta=1.5)
    with pytest.raises(ValueError, match="skew must be in"):
        skew_forward_kl_loss(s, s, skew=-0.1)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_per_token(s, s, "kl")
    with pytest.raises(ValueError, match="labels must have shape"):
        forward_kl_loss(s, s, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be positive"):
        forward_kl_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="shift"):
        forward_kl_loss(s[0], s[0], shift=True)
