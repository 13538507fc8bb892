"""Text for language-model distillation: fixed-length blocks of token ids, nothing downloaded.

The default corpus ships with Python: the prose of the interactive help (``pydoc_data.topics``), about 0.46 MB of
English. Tokens are bytes (UTF-8, vocabulary 256) unless a local Hugging Face tokenizer directory is given.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_kd.data.base import SplitDataModule, split_indices

__all__ = ["TextDataModule", "TokenBlocks", "default_corpus"]

BYTE_VOCAB_SIZE = 256
# Padding of the byte tokenizer: NUL, which text does not contain. Padded positions also carry attention_mask 0 and
# labels -100, so the id itself is never learned.
BYTE_PAD_ID = 0
IGNORE_INDEX = -100
# the standard-library modules read by ``corpus="stdlib"`` (source text, also a fallback when pydoc_data is missing)
_STDLIB_MODULES = ("argparse", "collections/__init__", "dataclasses", "functools", "inspect", "pathlib", "random",
                   "statistics", "string", "textwrap")


def default_corpus(corpus: str = "pydoc") -> list[str]:
    """Documents of a corpus that ships with Python: ``"pydoc"`` (the help topics of ``pydoc_data.topics``, sorted
    by name; the standard library's sources when a distribution strips them) or ``"stdlib"`` (the sources of a few
    standard-library modules)."""
    if corpus not in ("pydoc", "stdlib"):
        raise ValueError(f"unknown corpus {corpus!r}: choose 'pydoc' or 'stdlib', or pass text= or files=")
    if corpus == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            corpus = "stdlib"
        else:
            return [topics[name] for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = [(root / f"{name}.py").read_text(encoding="utf-8") for name in _STDLIB_MODULES
                 if (root / f"{name}.py").is_file()]
    if not documents:
        raise FileNotFoundError(f"no standard-library sources under {root}: pass text= or files=")
    return documents


class TokenBlocks(Dataset):
    """Blocks of token ids ``(N, seq_len)`` with their lengths; item ``i`` is a dict of ``input_ids``,
    ``attention_mask`` (1 on tokens, 0 on padding) and ``labels`` (the ids, -100 on padding; not shifted: the model
    or the loss shifts them)."""

    def __init__(self, blocks: torch.Tensor, lengths: torch.Tensor):
        self.blocks, self.lengths = blocks, lengths

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.blocks[index]
        attention_mask = (torch.arange(input_ids.shape[0]) < self.lengths[index]).long()
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TextDataModule(SplitDataModule):
    """Causal-LM batches ``{"input_ids", "attention_mask", "labels"}`` of shape ``(batch_size, seq_len)``.

    Text: ``text`` (one string or a list of documents), else ``files`` (UTF-8 text files), else the ``corpus``
    shipped with Python (:func:`default_corpus`). The documents are tokenized, joined with a separator (byte ``\\n\\n``
    or the tokenizer's end-of-sequence token) and cut into blocks of ``seq_len`` tokens; the last block is padded.
    The blocks are split at random (``split_seed``) into ``val_fraction`` for validation, ``test_fraction`` for test
    and the rest for training.

    Tokens: UTF-8 bytes by default (``vocab_size`` 256; padding uses id 0, with attention mask 0 and label -100), or
    the Hugging Face tokenizer saved in the local directory ``tokenizer`` (``AutoTokenizer.from_pretrained(dir,
    local_files_only=True)``; padding uses its pad, else end-of-sequence, token). ``vocab_size`` (linked to the
    model by the CLI) is ``len(tokenizer)``, including added tokens.
    """

    def __init__(self, text: str | Sequence[str] | None = None, files: Sequence[str] | None = None,
                 corpus: str = "pydoc", tokenizer: str | None = None, seq_len: int = 256, batch_size: int = 8,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, split_seed: int = 0,
                 shuffle_seed: int = 0, num_workers: int = 0, pin_memory: bool | None = None):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: a causal LM block needs at least 2 tokens")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and "
                             "leave blocks for training")
        if tokenizer is not None and not Path(tokenizer).is_dir():
            raise ValueError(f"tokenizer={tokenizer!r} is not a directory: give the local directory of a Hugging Face "
                             "tokenizer (save it once with tokenizer.save_pretrained(dir)), or None for bytes")
        self.save_hyperparameters()
        self.datasets = {}
        self._tokenizer = None
        self._tokens_per_byte: float | None = None

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer, or ``None`` for bytes."""
        if self.hparams.tokenizer is not None and self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer, local_files_only=True)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE if self.tokenizer is None else len(self.tokenizer)

    @property
    def num_classes(self) -> int:
        """The vocabulary size (the CLI links it to the model's ``num_classes``)."""
        return self.vocab_size

    @property
    def tokens_per_byte(self) -> float | None:
        """Tokens per UTF-8 byte of the text, for bits per byte: 1 for byte tokens; for a tokenizer, measured on the
        whole text by ``setup`` (``None`` before it)."""
        if self.hparams.tokenizer is None:
            return 1.0
        return self._tokens_per_byte

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return BYTE_PAD_ID
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def documents(self) -> list[str]:
        text, files = self.hparams.text, self.hparams.files
        if text is not None:
            return [text] if isinstance(text, str) else list(text)
        if files:
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise FileNotFoundError(f"text files not found: {missing}")
            return [Path(f).read_text(encoding="utf-8") for f in files]
        return default_corpus(self.hparams.corpus)

    def encode(self, documents: list[str]) -> list[int]:
        """All documents as one stream of token ids, separated by ``\\n\\n`` (bytes) or end-of-sequence."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            return list("\n\n".join(documents).encode("utf-8"))
        separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        ids: list[int] = []
        for i, document in enumerate(documents):
            if i:
                ids += separator
            ids += tokenizer(document, add_special_tokens=False)["input_ids"]
        return ids

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        documents = self.documents()
        ids = torch.tensor(self.encode(documents), dtype=torch.long)
        if self.hparams.tokenizer is not None:
            num_bytes = len("\n\n".join(documents).encode("utf-8"))
            self._tokens_per_byte = ids.numel() / max(num_bytes, 1)
        seq_len = self.hparams.seq_len
        if ids.numel() == 0:
            raise ValueError("the text is empty: pass text=, files= or a corpus with content")
        num_blocks = -(-ids.numel() // seq_len)
        blocks = torch.full((num_blocks * seq_len,), self.pad_id, dtype=torch.long)
        blocks[:ids.numel()] = ids
        lengths = torch.full((num_blocks,), seq_len, dtype=torch.long)
        lengths[-1] = ids.numel() - (num_blocks - 1) * seq_len
        blocks = blocks.view(num_blocks, seq_len)
        fractions = (self.hparams.val_fraction, self.hparams.test_fraction)
        val, test, train = split_indices(num_blocks, fractions, self.hparams.split_seed)
        if train.numel() == 0 or (fractions[0] > 0 and val.numel() == 0) or (fractions[1] > 0 and test.numel() == 0):
            raise ValueError(f"{ids.numel()} tokens make only {num_blocks} blocks of seq_len={seq_len}: too few for "
                             f"val_fraction={fractions[0]} and test_fraction={fractions[1]}; give more text, a shorter "
                             "seq_len or smaller fractions")
        for name, index in (("train", train), ("val", val), ("test", test)):
            self.datasets[name] = TokenBlocks(blocks[index], lengths[index])
        if not test.numel():
            self.datasets["test"] = self.datasets["val"]
