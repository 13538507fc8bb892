"""On-policy / sequence-level KD data: the per-step draw, generated continuations (prompt masked in the labels, the
model's own generate with the same seed, EOS padding, mode restored) and LanguageModelKD training on them."""

import doctest

import pytest
import torch

import lightning_kd.data.onpolicy

from conftest import make_trainer
from lightning_kd.data.onpolicy import choose_source, generate_continuations
from lightning_kd.data.text import TextDataModule
from lightning_kd.methods import LanguageModelKD
from lightning_kd.models.hf import tiny_causal_lm

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))


def tiny(seed):
    return tiny_causal_lm(vocab_size=256, hidden_size=32, layers=2, heads=4, seed=seed)


def text_data():
    return TextDataModule(text=TEXT, seq_len=16, batch_size=4, val_fraction=0.1, test_fraction=0.0)


def test_the_draw_follows_the_fractions_and_repeats():
    steps = range(2000)
    assert {choose_source(3, s, 0.0) for s in steps} == {"data"}
    assert {choose_source(3, s, 1.0) for s in steps} == {"student"}
    assert {choose_source(3, s, 0.0, 1.0) for s in steps} == {"teacher"}
    draws = [choose_source(3, s, 0.3, 0.2) for s in steps]
    assert 0.25 < draws.count("student") / 2000 < 0.35 and 0.15 < draws.count("teacher") / 2000 < 0.25
    assert draws == [choose_source(3, s, 0.3, 0.2) for s in steps]
    assert draws != [choose_source(4, s, 0.3, 0.2) for s in steps]
    with pytest.raises(ValueError, match="add up to more than 1"):
        choose_source(0, 0, 0.7, 0.5)
    with pytest.raises(ValueError, match=r"on_policy_fraction=1.5 must be a probability"):
        choose_source(0, 0, 1.5)


def test_continuations_keep_the_prompt_mask_it_in_the_labels_and_are_the_models_own_samples():
    model = tiny(0)
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # a padded last block: its prompt is not all tokens, so it keeps its own tokens
    out = generate_continuations(model, ids, mask, prompt_length=5, seed=11)
    assert model.training  # restored
    assert out["input_ids"].shape == (3, 12) and out["generated"].tolist() == [True, True, False]
    assert torch.equal(out["input_ids"][:2, :5], ids[:2, :5])
    assert (out["labels"][:2, :5] == -100).all()
    assert torch.equal(out["labels"][:2, 5:], out["input_ids"][:2, 5:])
    assert torch.equal(out["input_ids"][2], ids[2]) and torch.equal(out["attention_mask"][2], mask[2])
    assert (out["labels"][2, 4:] == -100).all() and torch.equal(out["labels"][2, :4], ids[2, :4])
    model.eval()
    torch.manual_seed(11)
    expected = model.generate(input_ids=ids[:2, :5], attention_mask=torch.ones(2, 5, dtype=torch.long),
                              do_sample=True, max_new_tokens=7, temperature=1.0, top_k=0, pad_token_id=0)
    assert torch.equal(out["input_ids"][:2], expected)
    again = generate_continuations(model, ids, mask, prompt_length=5, seed=11)
    assert torch.equal(again["input_ids"], out["input_ids"])
    assert not torch.equal(generate_continuations(model, ids, mask, prompt_length=5, seed=12)["input_ids"],
                           out["input_ids"])


def test_greedy_generation_pads_after_the_end_of_sequence_token():
    model = tiny(0).eval()
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    free = generate_continuations(model, ids, prompt_length=4, do_sample=False)
    model.generation_config.eos_token_id = int(free["input_ids"][0, 6])  # row 0 ends at its third new token
    out = generate_continuations(model, ids, prompt_length=4, do_sample=False, pad_token_id=0)
    stop = (out["input_ids"][0, 4:] == model.generation_config.eos_token_id).nonzero()[0, 0].item() + 4
    assert stop <= 6
    assert out["attention_mask"][0, :stop + 1].eq(1).all() and out["attention_mask"][0, stop + 1:].eq(0).all()
    assert (out["labels"][0, stop + 1:] == -100).all() and out["labels"][0, stop] == out["input_ids"][0, stop]
    with pytest.raises(ValueError, match="prompt_length=10"):
        generate_continuations(model, ids, prompt_length=10)


def spy(module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    setattr(module, name, wrapper)
    return calls


def fit(model, steps=3):
    batches = spy(model, "_training_step")
    trainer = make_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(model, datamodule=text_data())
    return trainer, [args[0] for args, _, _ in batches]


def test_no_generation_at_lambda_zero():
    model = LanguageModelKD(tiny(0), tiny(1), on_policy_fraction=0.0, sequence_kd_fraction=0.0)
    student_calls, teacher_calls = spy(model.student, "generate"), spy(model.teacher, "generate")
    _, batches = fit(model, steps=2)
    assert not student_calls and not teacher_calls
    assert all(batch.generated is None for batch in batches)


def test_on_policy_reverse_kl_trains_on_the_students_samples_only():
    model = LanguageModelKD(tiny(0), tiny(1), divergence="reverse_kl", on_policy_fraction=1.0, prompt_length=6,
                            generation_seed=7)
    student_calls, teacher_calls = spy(model.student, "generate"), spy(model.teacher, "generate")
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer, batches = fit(model)
    assert len(student_calls) == 3 and not teacher_calls
    for batch, (_, kwargs, sequences) in zip(batches, student_calls):
        assert batch.generated == "student" and kwargs["do_sample"] is True
        assert (batch.target[:, :6] == -100).all()
        assert torch.equal(batch.input[:, 6:], sequences[:, 6:])
    assert trainer.callback_metrics["train/on_policy"].item() == 1.0
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    # the same seed repeats the samples
    repeat = LanguageModelKD(tiny(0), tiny(1), divergence="reverse_kl", on_policy_fraction=1.0, prompt_length=6,
                             generation_seed=7)
    _, repeated = fit(repeat, steps=1)
    assert torch.equal(repeated[0].input, batches[0].input)


def test_sequence_kd_trains_on_the_teachers_greedy_generation():
    model = LanguageModelKD(tiny(0), tiny(1), sequence_kd_fraction=1.0, prompt_length=4)
    student_calls, teacher_calls = spy(model.student, "generate"), spy(model.teacher, "generate")
    trainer, batches = fit(model, steps=2)
    assert not student_calls and len(teacher_calls) == 2
    for batch, (_, kwargs, _) in zip(batches, teacher_calls):
        assert batch.generated == "teacher" and kwargs["do_sample"] is False
        prompt = batch.input[:, :4]
        greedy = model.teacher.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        max_new_tokens=12, pad_token_id=0)
        assert torch.equal(batch.input, greedy)
        assert (batch.target[:, :4] == -100).all()
    assert trainer.callback_metrics["train/sequence_kd"].item() == 1.0
    assert trainer.callback_metrics["train/on_policy"].item() == 0.0


def test_mixed_fractions_and_bad_options():
    model = LanguageModelKD(tiny(0), tiny(1), divergence="jsd", on_policy_fraction=0.5, generation_seed=1)
    trainer, batches = fit(model, steps=6)
    generated = [batch.generated == "student" for batch in batches]
    assert trainer.callback_metrics["train/on_policy"].item() == pytest.approx(sum(generated) / len(generated))
    with pytest.raises(ValueError, match="pass a teacher"):
        LanguageModelKD(tiny(0), kd_weight=0, sequence_kd_fraction=0.5)
    with pytest.raises(ValueError, match="add up to more than 1"):
        LanguageModelKD(tiny(0), tiny(1), on_policy_fraction=0.6, sequence_kd_fraction=0.6)


def test_docstring_examples_run():
    result = doctest.testmod(lightning_kd.data.onpolicy)
    assert result.attempted > 0 and result.failed == 0
