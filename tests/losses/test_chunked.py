"""Tests for lightning_kd.losses.chunked: the chunked LM-head path equals the dense computation (full logits from
``F.linear``, the token losses and ``F.cross_entropy``) in value and in gradient w.r.t. the student's hidden states,
head weight and head bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses.chunked import chunked_distillation_loss
from lightning_kd.losses.token import token_distillation_loss

B, T, H, HT, V = 2, 7, 6, 5, 11


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_hidden=torch.randn(B, T, H, generator=g),
        student_head_weight=torch.randn(V, H, generator=g) * 0.5,
        student_head_bias=torch.randn(V, generator=g) * 0.1 if bias else None,
        teacher_hidden=torch.randn(B, T, HT, generator=g),
        teacher_head_weight=torch.randn(V, HT, generator=g) * 0.5,
        teacher_head_bias=torch.randn(V, generator=g) * 0.1 if bias else None,
    )


def _labels_and_mask():
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100  # a prompt that does not count
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    labels[1, 5:] = -100
    return labels, mask


def _dense(x, labels, mask, shift, **options):
    """The reference: full logits of both models, then the token loss and the cross-entropy."""
    student_logits = F.linear(x["student_hidden"], x["student_head_weight"], x["student_head_bias"])
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_head_weight"], x["teacher_head_bias"])
    kd = token_distillation_loss(student_logits, teacher_logits, labels, mask=mask, shift=shift, **options)
    if shift:
        student_logits, labels, mask = student_logits[:, :-1], labels[:, 1:], mask[:, 1:]
    targets = labels.masked_fill(mask == 0, -100)
    ce = F.cross_entropy(student_logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    return kd, ce


def _grads(loss, x, names=("student_hidden", "student_head_weight", "student_head_bias")):
    return torch.autograd.grad(loss, [x[n] for n in names], retain_graph=True)


@pytest.mark.parametrize("divergence,options", [
    ("forward_kl", {}),
    ("reverse_kl", {"temperature": 2.0, "scale_by_temperature_squared": True}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"skew": 0.2}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("tvd", {}),
])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("shift", [False, True])
def test_equals_dense_value_and_gradient(divergence, options, chunk_size, shift):
    labels, mask = _labels_and_mask()
    x = {k: v.requires_grad_(True) if k.startswith("student") else v for k, v in _inputs().items()}
    kd_ref, ce_ref = _dense(x, labels, mask, shift, divergence=divergence, **options)
    kd, ce = chunked_distillation_loss(**x, labels=labels, mask=mask, shift=shift, divergence=divergence,
                                       chunk_size=chunk_size, **options)
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_ref)
    for total, total_ref in ((kd + 0.7 * ce, kd_ref + 0.7 * ce_ref), (kd, kd_ref)):
        for grad, grad_ref in zip(_grads(total, x), _grads(total_ref, x)):
            torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
            assert grad.abs().sum() > 0


def test_teacher_logits_flat_inputs_and_no_bias():
    x = _inputs(seed=3, bias=False)
    labels, mask = _labels_and_mask()
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_head_weight"])
    student = x["student_hidden"].requires_grad_(True)
    kd, ce = chunked_distillation_loss(student, x["student_head_weight"], labels=labels, mask=mask,
                                       teacher_logits=teacher_logits, divergence="jsd", chunk_size=3, shift=True)
    kd_ref, ce_ref = _dense(x, labels, mask, True, divergence="jsd")
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_ref)
    # (N, H) inputs without labels: every token counts, and there is no cross-entropy
    flat = chunked_distillation_loss(student.reshape(-1, H), x["student_head_weight"],
                                     x["teacher_hidden"].reshape(-1, HT), x["teacher_head_weight"], chunk_size=5)
    assert flat.ce is None
    dense = token_distillation_loss(F.linear(student, x["student_head_weight"]), teacher_logits)
    torch.testing.assert_close(flat.distillation, dense)


def test_vocab_slice_and_the_mismatch_error():
    x = _inputs(seed=4)
    padded = torch.cat([x["teacher_head_weight"], torch.randn(5, HT)])  # a teacher vocabulary padded to V + 5
    with pytest.raises(ValueError, match="vocab_slice"):
        chunked_distillation_loss(x["student_hidden"], x["student_head_weight"], x["teacher_hidden"], padded)
    kd, _ = chunked_distillation_loss(x["student_hidden"], x["student_head_weight"], x["teacher_hidden"], padded,
                                      student_head_bias=x["student_head_bias"], vocab_slice=V, chunk_size=4)
    student_logits = F.linear(x["student_hidden"], x["student_head_weight"], x["student_head_bias"])
    teacher_logits = F.linear(x["teacher_hidden"], padded)[..., :V]
    torch.testing.assert_close(kd, token_distillation_loss(student_logits, teacher_logits))


def test_global_count_over_micro_batches_and_empty_batches():
    x = _inputs(seed=5)
    labels, mask = _labels_and_mask()
    whole = chunked_distillation_loss(**x, labels=labels, mask=mask, shift=True, chunk_size=4)
    count = float(((labels[:, 1:] != -100) & (mask[:, 1:] != 0)).sum())
    parts = [chunked_distillation_loss(**{k: (v[i:i + 1] if "hidden" in k else v) for k, v in x.items()},
                                       labels=labels[i:i + 1], mask=mask[i:i + 1], shift=True, chunk_size=4,
                                       num_valid_tokens=torch.tensor(count)) for i in range(B)]
    torch.testing.assert_close(parts[0].distillation + parts[1].distillation, whole.distillation)
    torch.testing.assert_close(parts[0].ce + parts[1].ce, whole.ce)
    # no valid token: zero losses that still backpropagate (to zero gradients)
    hidden = x["student_hidden"].requires_grad_(True)
    empty = chunked_distillation_loss(**x, labels=torch.full((B, T), -100), chunk_size=4)
    assert empty.distillation.item() == 0.0 and empty.ce.item() == 0.0
    (grad,) = torch.autograd.grad(empty.distillation + empty.ce, hidden)
    assert grad.abs().sum() == 0


def test_no_full_logits_are_kept_for_backward():
    """The tensors saved for backward outside the chunks are the inputs, never a (tokens, V) block."""
    x = _inputs(seed=6)
    x["student_hidden"].requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_distillation_loss(**x, chunk_size=2)
    assert not any(len(shape) == 2 and shape[0] > 2 and shape[1] == V for shape in saved), saved


def test_bad_inputs_name_the_problem():
    x = _inputs()
    with pytest.raises(ValueError, match="either as teacher_hidden"):
        chunked_distillation_loss(x["student_hidden"], x["student_head_weight"])
    with pytest.raises(ValueError, match="head weight must have shape"):
        chunked_distillation_loss(x["student_hidden"], x["student_head_weight"].T, x["teacher_hidden"],
                                  x["teacher_head_weight"])
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_distillation_loss(**x, divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(**x, chunk_size=0)


def test_with_hugging_face_models_and_text_batches():
    """From a text batch through tiny Llama models: the chunked loss on final hidden states and LM heads equals the
    dense loss on the models' logits, down to the gradients of the student's parameters."""
    from lightning_kd.data.text import TextDataModule
    from lightning_kd.models.hf import final_hidden_states, lm_head, tiny_causal_lm

    data = TextDataModule(text="a causal language model predicts the next byte. " * 3, seq_len=32, batch_size=2,
                          val_fraction=0.0, test_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    student = tiny_causal_lm(hidden_size=32, layers=1, heads=2, seed=0)
    teacher = tiny_causal_lm(hidden_size=48, layers=1, heads=2, seed=1).eval()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, ids, mask)
    kd, ce = chunked_distillation_loss(final_hidden_states(student, ids, mask), lm_head(student)[0], teacher_hidden,
                                       lm_head(teacher)[0], labels, mask=mask, shift=True, divergence="reverse_kl",
                                       chunk_size=16)
    chunked_grads = torch.autograd.grad(kd + ce, list(student.parameters()))
    with torch.no_grad():
        teacher_logits = teacher(ids, attention_mask=mask).logits
    student_out = student(ids, attention_mask=mask, labels=labels)  # the model's own shifted cross-entropy
    kd_ref = token_distillation_loss(student_out.logits, teacher_logits, labels, mask=mask, shift=True,
                                     divergence="reverse_kl")
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, student_out.loss)
    dense_grads = torch.autograd.grad(kd_ref + student_out.loss, list(student.parameters()))
    for grad, grad_ref in zip(chunked_grads, dense_grads):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
