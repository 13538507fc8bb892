"""Tests for lightning_kd.data.text: byte and tokenizer blocks, padding, splits, batches."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.data.text import TextDataModule, default_corpus


def _module(**kwargs) -> TextDataModule:
    dm = TextDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _all_blocks(dm, split):
    return [dm.datasets[split][i] for i in range(len(dm.datasets[split]))]


def test_byte_blocks_padding_and_labels():
    text = "hello world, 12345"  # 18 bytes -> blocks of 8: 8 + 8 + 2 (padded)
    dm = _module(text=text, seq_len=8, val_fraction=0.0, test_fraction=0.0)
    assert dm.vocab_size == 256
    items = _all_blocks(dm, "train")
    assert len(items) == 3
    by_length = sorted(items, key=lambda item: int(item["attention_mask"].sum()))
    short = by_length[0]
    assert short["attention_mask"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert short["input_ids"].tolist()[:2] == list(b"45") and short["input_ids"].tolist()[2:] == [0] * 6
    assert short["labels"].tolist() == list(b"45") + [-100] * 6
    full = by_length[-1]
    assert torch.equal(full["labels"], full["input_ids"])  # labels are the ids, not shifted
    # the blocks put back together are the text
    joined = b"".join(bytes(item["input_ids"][item["attention_mask"].bool()].tolist()) for item in items)
    assert sorted(joined) == sorted(text.encode())
    assert {bytes(item["input_ids"][:8].tolist()) for item in items} >= {b"hello wo", b"rld, 123"}


def test_documents_joined_and_utf8():
    dm = _module(text=["ab", "é"], seq_len=16, val_fraction=0.0, test_fraction=0.0)
    (item,) = _all_blocks(dm, "train")
    n = int(item["attention_mask"].sum())
    assert bytes(item["input_ids"][:n].tolist()).decode("utf-8") == "ab\n\né"


def test_seeded_splits_and_batches():
    text = "".join(chr(ord("a") + i % 26) for i in range(40 * 16))  # 40 blocks of 16
    dm = _module(text=text, seq_len=16, val_fraction=0.1, test_fraction=0.2, batch_size=4, split_seed=3)
    sizes = {name: len(dm.datasets[name]) for name in ("train", "val", "test")}
    assert sizes == {"train": 28, "val": 4, "test": 8}
    same = _module(text=text, seq_len=16, val_fraction=0.1, test_fraction=0.2, split_seed=3)
    other = _module(text=text, seq_len=16, val_fraction=0.1, test_fraction=0.2, split_seed=4)
    assert torch.equal(dm.datasets["val"].blocks, same.datasets["val"].blocks)
    assert not torch.equal(dm.datasets["train"].blocks, other.datasets["train"].blocks)
    # the three splits partition the blocks
    whole = _module(text=text, seq_len=16, val_fraction=0.0, test_fraction=0.0).datasets["train"].blocks
    parts = torch.cat([dm.datasets[name].blocks for name in sizes])
    assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, whole.tolist()))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long


def test_default_corpus_ships_with_python():
    documents = default_corpus()
    assert len(documents) > 50 and sum(map(len, documents)) > 100_000
    assert any("assert" in d for d in documents)
    assert default_corpus("stdlib")
    dm = TextDataModule(seq_len=512, batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 500 and len(dm.datasets["val"]) > 20
    assert int(dm.datasets["train"].blocks.max()) < 256


def test_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    dm = _module(files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], seq_len=64, val_fraction=0.0,
                 test_fraction=0.0)
    (item,) = _all_blocks(dm, "train")
    assert bytes(item["labels"][item["labels"] >= 0].tolist()) == b"first file\n\nsecond"
    with pytest.raises(FileNotFoundError, match="not found"):
        _module(files=[str(tmp_path / "missing.txt")])


def test_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(tmp_path)
    dm = _module(text=["the cat sat", "on the dog"], tokenizer=str(tmp_path), seq_len=5, val_fraction=0.0,
                 test_fraction=0.0)
    assert dm.vocab_size == len(words)
    items = sorted(_all_blocks(dm, "train"), key=lambda item: -int(item["attention_mask"].sum()))
    assert items[0]["input_ids"].tolist() == [3, 4, 5, 2, 6]  # the cat sat [EOS] on
    assert items[1]["input_ids"].tolist() == [3, 0, 1, 1, 1]  # the [UNK] [PAD] [PAD] [PAD]
    assert items[1]["labels"].tolist() == [3, 0, -100, -100, -100]


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="local directory of a Hugging Face tokenizer"):
        TextDataModule(tokenizer="gpt2")
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=1)
    with pytest.raises(ValueError, match="too few"):
        _module(text="short", seq_len=4, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ValueError, match="unknown corpus"):
        _module(corpus="wikipedia")
