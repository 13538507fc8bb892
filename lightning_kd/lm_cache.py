"""Sparse teacher outputs of a language model computed once per training token, stored on disk and replayed.

The training blocks of a :class:`~lightning_kd.data.text.TextDataModule` are a function of the text, the tokenizer,
``seq_len`` and the split seed, the same in every run and epoch; only their order changes. So the teacher's next-token
distribution at every training position can be computed once, before training, and the training steps replay it
instead of running the teacher. What is stored is the sparse teacher of :mod:`lightning_kd.losses.sparse`: the
``top_k`` largest log-probabilities at ``temperature`` and their token ids (the rest of the mass is the tail bucket
the sparse divergences use); the token terms then compare the student with it over ``top_k + 1`` buckets.

Storage: a folder under ``path`` named by the fingerprint of everything the outputs depend on (the teacher's weights,
the training blocks' content, ``seq_len``, ``top_k``, ``temperature``, the storage dtype, the vocabulary slice and the
precision), so another teacher or other data get another folder and are built afresh. It holds ``values.npy``
(float16 or float32, ``blocks × seq_len × k``), ``indices.npy`` (int32, same shape), both memory-mapped and loaded
with ``allow_pickle=False``, and ``meta.json``, written last (a half-built folder is never reused).

Training batches must carry their block's index: the callback gives the data module's training split an ``index``
per item (:func:`lightning_kd.data.indexed.index_training_split`). Batches generated on-policy or for sequence-level
KD (``LanguageModelKD(on_policy_fraction=..., sequence_kd_fraction=...)``) have no stored outputs and use the live
teacher; validation always does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_kd.cache import fingerprint
from lightning_kd.data.indexed import IndexedDataset, index_training_split, training_split
from lightning_kd.data.text import TokenBlocks
from lightning_kd.losses.sparse import sparse_teacher
from lightning_kd.methods.base import Batch

__all__ = ["TokenTeacherCache", "token_data_fingerprint"]

_DTYPES = {"float16": np.float16, "float32": np.float32}


def _blocks(dataset: Dataset) -> Dataset:
    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


def token_data_fingerprint(dataset: Dataset) -> str:
    """SHA-1 of every block's ``input_ids`` and ``attention_mask`` (in order)."""
    dataset = _blocks(dataset)
    digest = hashlib.sha1()
    if isinstance(dataset, TokenBlocks):
        digest.update(dataset.blocks.cpu().contiguous().numpy().tobytes())
        digest.update(dataset.lengths.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
    for i in range(len(dataset)):
        item = dataset[i]
        digest.update(torch.as_tensor(item["input_ids"]).long().numpy().tobytes())
        mask = item.get("attention_mask")
        digest.update(b"-" if mask is None else torch.as_tensor(mask).long().numpy().tobytes())
    return digest.hexdigest()


class TokenTeacherCache(L.Callback):
    """Replay a language-model teacher's top-``k`` outputs for the training blocks from a cache built once.

    Args:
        path: folder holding the caches (one sub-folder per fingerprint).
        top_k: tokens kept per position (at most the vocabulary).
        temperature: temperature of the stored log-probabilities; must equal the token terms' temperature.
        dtype: ``"float16"`` (half the disk) or ``"float32"`` (replay equal to the live sparse teacher).
        batch_size: blocks per teacher forward while building.

    Use with :class:`~lightning_kd.methods.LanguageModelKD` whose terms are :class:`~lightning_kd.terms.TokenKLTerm`
    s (not chunked, not standardized) and a data module keeping its splits in ``datasets`` (e.g.
    :class:`~lightning_kd.data.TextDataModule`). Under DDP the first process builds while the others wait.

    >>> # lightning-kd fit --model LanguageModelKD ... --data TextDataModule \\
    >>> #     --trainer.callbacks+=lightning_kd.lm_cache.TokenTeacherCache --trainer.callbacks.path cache/lm
    """

    def __init__(self, path: str | os.PathLike, top_k: int = 64, temperature: float = 1.0, dtype: str = "float16",
                 batch_size: int = 32):
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be a positive number of tokens")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose 'float16' or 'float32'")
        self.path, self.top_k, self.temperature, self.dtype = Path(path), top_k, float(temperature), dtype
        self.batch_size = batch_size
        #: the folder of the cache in use (set by :meth:`build`)
        self.directory: Path | None = None
        #: seconds the last build took (``None`` when an existing cache was reused)
        self.build_seconds: float | None = None
        self._values: np.ndarray | None = None
        self._indices: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------- building
    def meta(self, teacher: nn.Module, dataset: Dataset, vocab: int, precision: str = "32-true") -> dict[str, Any]:
        """What the stored outputs depend on."""
        blocks = _blocks(dataset)
        seq_len = int(blocks[0]["input_ids"].shape[-1])
        return {"teacher": fingerprint(teacher), "data": token_data_fingerprint(blocks), "num_blocks": len(blocks),
                "seq_len": seq_len, "vocab": int(vocab), "top_k": min(self.top_k, int(vocab)),
                "temperature": self.temperature, "dtype": self.dtype, "precision": str(precision)}

    def directory_for(self, meta: dict[str, Any]) -> Path:
        """The sub-folder of ``path`` named by the fingerprint of ``meta``."""
        key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        return self.path / key

    def _complete(self, directory: Path, meta: dict[str, Any]) -> bool:
        try:
            return json.loads((directory / "meta.json").read_text()) == meta
        except (OSError, ValueError):
            return False

    @torch.no_grad()
    def build(self, teacher: nn.Module, dataset: Dataset, *, vocab_slice: int | None = None,
              precision: str = "32-true", forward_context: Callable[[], ContextManager] = nullcontext,
              write: bool = True) -> Path:
        """The cache folder of ``teacher`` on the blocks of ``dataset`` (items ``{"input_ids", "attention_mask"}``),
        built when absent (only when ``write``); then opened for :meth:`replay`."""
        head = teacher.get_output_embeddings() if callable(getattr(teacher, "get_output_embeddings", None)) else None
        vocab = vocab_slice or (head.out_features if isinstance(head, nn.Linear) else teacher.config.vocab_size)
        meta = self.meta(teacher, dataset, vocab, precision)
        directory = self.directory_for(meta)
        self.build_seconds = None
        if write and not self._complete(directory, meta):
            started = time.perf_counter()
            self._write(teacher, _blocks(dataset), directory, meta, vocab_slice, forward_context)
            self.build_seconds = time.perf_counter() - started
        self.open(directory)
        return directory

    def _write(self, teacher: nn.Module, blocks: Dataset, directory: Path, meta: dict[str, Any],
               vocab_slice: int | None, forward_context: Callable[[], ContextManager]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)
        shape = (meta["num_blocks"], meta["seq_len"], meta["top_k"])
        values = np.lib.format.open_memmap(directory / "values.npy", mode="w+", dtype=_DTYPES[self.dtype],
                                           shape=shape)
        indices = np.lib.format.open_memmap(directory / "indices.npy", mode="w+", dtype=np.int32, shape=shape)
        device = next(teacher.parameters()).device
        training = teacher.training
        teacher.eval()
        try:
            for start in range(0, shape[0], self.batch_size):
                items = [blocks[i] for i in range(start, min(start + self.batch_size, shape[0]))]
                input_ids = torch.stack([torch.as_tensor(item["input_ids"]) for item in items]).to(device)
                mask = [item.get("attention_mask") for item in items]
                mask = None if mask[0] is None else torch.stack([torch.as_tensor(m) for m in mask]).to(device)
                with forward_context():
                    output = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False)
                logits = output if isinstance(output, Tensor) else output.logits
                if vocab_slice:
                    logits = logits[..., :vocab_slice]
                top_values, top_indices = sparse_teacher(logits, meta["top_k"], self.temperature)
                values[start:start + len(items)] = top_values.cpu().numpy().astype(values.dtype)
                indices[start:start + len(items)] = top_indices.int().cpu().numpy()
        finally:
            teacher.train(training)
        values.flush()
        indices.flush()
        del values, indices
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))

    def open(self, directory: Path) -> None:
        """Memory-map the stored values and indices of ``directory``."""
        self.directory = Path(directory)
        self._values = np.load(self.directory / "values.npy", mmap_mode="r", allow_pickle=False)
        self._indices = np.load(self.directory / "indices.npy", mmap_mode="r", allow_pickle=False)

    # ----------------------------------------------------------------------------------------------- replay
    def replay(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The stored ``(values, indices)`` of the blocks in ``batch`` (its ``index``): float32 log-probabilities and
        int64 token ids, ``(B, seq_len, k)``, on the device of the batch's tokens."""
        if self._values is None:
            raise RuntimeError("the token teacher cache is not built or opened: call build() or train with the "
                               "callback")
        if batch.index is None:
            raise ValueError("replaying teacher outputs needs each batch's block indices (batch['index']): train with "
                             "the TokenTeacherCache callback on a data module keeping its splits in `datasets` (e.g. "
                             "TextDataModule), which adds them")
        rows = batch.index.cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._values.shape[0]):
            raise ValueError(f"block index {int(rows.max())} is outside the cache of {self._values.shape[0]} blocks "
                             f"in {self.directory}: the data changed since it was built")
        if batch.input.shape[-1] != self._values.shape[1]:
            raise ValueError(f"the batch has blocks of {batch.input.shape[-1]} tokens but the cache in "
                             f"{self.directory} holds {self._values.shape[1]} per block")
        device = batch.input.device
        values = torch.from_numpy(np.ascontiguousarray(self._values[rows])).to(device).float()
        indices = torch.from_numpy(np.ascontiguousarray(self._indices[rows])).to(device).long()
        return values, indices

    # ------------------------------------------------------------------------------------------ callback hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and index_training_split(trainer.datamodule) is None:
            raise ValueError("TokenTeacherCache needs a data module keeping its splits in a `datasets` dict with a "
                             "'train' entry (e.g. lightning_kd.data.TextDataModule) passed as trainer.fit(model, "
                             "datamodule=...): its training blocks are what the cache stores")

    def _check_module(self, pl_module: L.LightningModule) -> None:
        from lightning_kd.terms.token import TAIDTerm, TokenKLTerm

        if getattr(pl_module, "teacher", None) is None or not hasattr(pl_module, "terms"):
            raise ValueError("TokenTeacherCache needs a LanguageModelKD with a teacher")
        if pl_module.teacher_layers:
            raise ValueError(f"the terms read the teacher's layers ({', '.join(pl_module.teacher_layers)}); "
                             "TokenTeacherCache replays top-k outputs only: remove the callback or those terms")
        for name, term in pl_module.terms.items():
            if not isinstance(term, TokenKLTerm) or isinstance(term, TAIDTerm):
                raise ValueError(f"term {name!r} ({type(term).__name__}) needs the teacher's full logits; "
                                 "TokenTeacherCache replays top-k outputs for TokenKLTerm only")
            if term.chunked or term.standardize:
                raise ValueError(f"term {name!r} has chunked={term.chunked}, standardize={term.standardize}: the "
                                 "replayed top-k outputs need chunked=False and standardize=False")
            if term.temperature != self.temperature:
                raise ValueError(f"term {name!r} has temperature={term.temperature} but the cache stores "
                                 f"log-probabilities at temperature={self.temperature}: give both the same value")
            if term.top_k is not None and term.top_k != self.top_k:
                raise ValueError(f"term {name!r} has top_k={term.top_k} but the cache stores top_k={self.top_k}: "
                                 "give both the same value (or leave the term's top_k None)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_module(pl_module)
        dataset = training_split(trainer.datamodule)
        vocab_slice = pl_module.hparams.get("vocab_slice")
        options = dict(vocab_slice=vocab_slice, precision=str(trainer.precision),
                       forward_context=trainer.precision_plugin.forward_context)
        if trainer.is_global_zero:
            self.build(pl_module.teacher, dataset, **options)
        trainer.strategy.barrier("token_teacher_cache")
        if not trainer.is_global_zero:
            self.build(pl_module.teacher, dataset, write=False, **options)
        pl_module.replay_teacher = self.replay

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.replay_teacher = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
