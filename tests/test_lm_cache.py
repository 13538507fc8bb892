"""TokenTeacherCache: replayed top-k outputs equal the live teacher's, a cached run never runs the teacher's forward in
training and its loss equals the live sparse loss, another teacher gets another fingerprint, loads never unpickle."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from conftest import make_trainer
from lightning_kd.data.text import TextDataModule
from lightning_kd.lm_cache import TokenTeacherCache, token_data_fingerprint
from lightning_kd.losses.sparse import sparse_teacher, sparse_token_distillation_loss
from lightning_kd.methods.lm import TokenBatch
from lightning_kd.methods import LanguageModelKD
from lightning_kd.models.hf import tiny_causal_lm
from lightning_kd.terms import TAIDTerm, TokenKLTerm, term_from_spec

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))  # ~2.2 kB


def tiny(seed):
    return tiny_causal_lm(vocab_size=256, hidden_size=32, layers=2, heads=4, seed=seed)


def text_data(batch_size=4):
    return TextDataModule(text=TEXT, seq_len=16, batch_size=batch_size, val_fraction=0.1, test_fraction=0.0)


def train_blocks(**options):
    data = TextDataModule(**{**dict(text=TEXT, seq_len=16, val_fraction=0.1, test_fraction=0.0), **options})
    data.setup("fit")
    return data.datasets["train"]


def test_text_blocks_are_deterministic_and_their_fingerprint_follows_them():
    assert token_data_fingerprint(train_blocks()) == token_data_fingerprint(train_blocks())
    assert torch.equal(train_blocks().blocks, train_blocks().blocks)
    assert token_data_fingerprint(train_blocks(split_seed=1)) != token_data_fingerprint(train_blocks())
    assert token_data_fingerprint(train_blocks(seq_len=8)) != token_data_fingerprint(train_blocks())


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 2e-3)])
def test_replayed_outputs_equal_the_live_teachers_top_k(tmp_path, dtype, tolerance):
    teacher, blocks = tiny(1), train_blocks()
    cache = TokenTeacherCache(tmp_path, top_k=5, temperature=2.0, dtype=dtype, batch_size=16)
    directory = cache.build(teacher, blocks)
    assert cache.build_seconds is not None
    rows = [3, 0, len(blocks) - 1]
    batch = LanguageModelKD.unpack_batch({**default_collate([blocks[i] for i in rows]), "index": torch.tensor(rows)})
    values, indices = cache.replay(batch)
    with torch.no_grad():
        logits = teacher.eval()(input_ids=batch.input, attention_mask=batch.attention_mask).logits
    live_values, live_indices = sparse_teacher(logits, 5, temperature=2.0)
    assert torch.equal(indices, live_indices)
    torch.testing.assert_close(values, live_values, rtol=tolerance, atol=tolerance)
    stored = np.load(directory / "values.npy", allow_pickle=False)
    assert stored.dtype == np.dtype(dtype) and stored.shape == (len(blocks), 16, 5)
    assert np.load(directory / "indices.npy", allow_pickle=False).dtype == np.int32
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["seq_len"], meta["top_k"], meta["temperature"]) == (16, 5, 2.0)


def test_a_changed_teacher_gets_another_fingerprint_and_is_rebuilt(tmp_path):
    teacher, blocks = tiny(1), train_blocks()
    cache = TokenTeacherCache(tmp_path, top_k=4)
    first = cache.build(teacher, blocks)
    assert cache.build(teacher, blocks) == first and cache.build_seconds is None  # reused
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] += 1.0
    second = cache.build(teacher, blocks)
    assert second != first and cache.build_seconds is not None
    other_k = TokenTeacherCache(tmp_path, top_k=3).build(teacher, blocks)
    other_data = cache.build(teacher, torch.utils.data.Subset(blocks, range(5)))
    assert len({first, second, other_k, other_data}) == 4


class CountForwards:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.calls += 1


def test_a_cached_run_skips_the_teacher_and_equals_the_live_sparse_loss(tmp_path):
    teacher = tiny(1)
    cache = TokenTeacherCache(tmp_path, top_k=8, dtype="float32")
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[cache]).fit(
        LanguageModelKD(tiny(0), teacher, top_k=8), datamodule=text_data())
    assert cache.build_seconds is not None

    counter = CountForwards(teacher)
    model = LanguageModelKD(tiny(0), teacher, top_k=8, divergence="reverse_kl")
    with pytest.raises(ValueError, match="temperature"):
        make_trainer(max_steps=1, callbacks=[cache]).fit(LanguageModelKD(tiny(0), teacher, temperature=2.0),
                                                         datamodule=text_data())
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    counter.calls = 0
    trainer = make_trainer(max_steps=3, limit_val_batches=0, callbacks=[cache])
    data = text_data()
    trainer.fit(model, datamodule=data)
    assert cache.build_seconds is None  # the first run's cache
    assert counter.calls == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())

    blocks = data.datasets["train"]  # items carry their "index" now
    batch = model.unpack_batch(default_collate([blocks[i] for i in (7, 2, 5)]))
    assert batch.index.tolist() == [7, 2, 5]
    model.train()
    model.replay_teacher = cache.replay
    cached = model.distillation_losses(batch, *model._forward_pair(batch, 0))["kd"]
    assert counter.calls == 0
    model.replay_teacher = None
    live = model.distillation_losses(batch, *model._forward_pair(batch, 0))["kd"]
    assert counter.calls == 1
    assert cached.item() == pytest.approx(live.item(), rel=1e-6)
    # the live top-k term is the sparse loss of the teacher's logits
    with torch.no_grad():
        student_logits = model(batch.input, batch.attention_mask)
        teacher_logits = teacher(input_ids=batch.input, attention_mask=batch.attention_mask).logits
    expected = sparse_token_distillation_loss(student_logits, *sparse_teacher(teacher_logits, 8), batch.target,
                                              divergence="reverse_kl", mask=batch.attention_mask, shift=True)
    assert live.item() == pytest.approx(expected.item(), rel=1e-5)
    assert term_from_spec(model.terms["kd"].spec(), "kd").top_k == 8
    # generated batches have no stored outputs: the live teacher runs
    model.replay_teacher = cache.replay
    generated = TokenBatch(batch.input, batch.target, attention_mask=batch.attention_mask, generated="student")
    counter.calls = 0
    model.forward_teacher(generated)
    assert counter.calls == 1


def test_top_k_options_are_checked():
    with pytest.raises(ValueError, match="top_k=0 must be a positive"):
        TokenKLTerm(top_k=0)
    with pytest.raises(ValueError, match="chunked=True never forms them"):
        TokenKLTerm(top_k=4, chunked=True)
    with pytest.raises(ValueError, match="leave top_k=None"):
        TAIDTerm(top_k=4)


def test_terms_that_need_full_teacher_logits_are_refused(tmp_path):
    model = LanguageModelKD(tiny(0), tiny(1), terms={"taid": TAIDTerm()})
    with pytest.raises(ValueError, match="full logits"):
        make_trainer(max_steps=1, callbacks=[TokenTeacherCache(tmp_path)]).fit(model, datamodule=text_data())
