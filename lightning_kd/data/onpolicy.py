"""On-policy and sequence-level distillation data: a block's continuation replaced by one a model generates.

Generalized knowledge distillation (GKD; Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024) trains, with probability ``λ`` per batch, on the student's own samples
``y ~ q(· | x)`` for the prompts ``x`` of the data, and otherwise on the data; sequence-level KD (Kim & Rush,
"Sequence-Level Knowledge Distillation", EMNLP 2016) trains on the teacher's (greedy or sampled) outputs. Here the
prompt is the first ``prompt_length`` tokens of each block; :func:`generate_continuations` lets a model complete it
(its own ``generate``, in eval mode, without gradients) and returns a batch whose labels leave the prompt out
(``-100``), so the loss is taken on the generated tokens only. :func:`choose_source` draws, per step, where a batch
comes from. Both are functions of a seed and the step, so runs (and resumed runs) repeat exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SOURCES", "choose_source", "generate_continuations", "step_seed"]

SOURCES = ("data", "student", "teacher")
IGNORE_INDEX = -100


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (e.g. the step and the rank), the same in every process."""
    digest = hashlib.sha256(repr((int(seed), *map(int, keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def choose_source(seed: int, step: int, on_policy_fraction: float, sequence_kd_fraction: float = 0.0) -> str:
    """Where the batch of ``step`` comes from: ``"student"`` with probability ``on_policy_fraction`` (on-policy, GKD's
    λ), ``"teacher"`` with probability ``sequence_kd_fraction`` (sequence-level KD), else ``"data"``. One uniform
    draw from a generator seeded by ``(seed, step)``: every rank makes the same choice.

    >>> choose_source(0, 5, 0.0), choose_source(0, 5, 1.0), choose_source(0, 5, 0.0, 1.0)
    ('data', 'student', 'teacher')
    """
    for name, value in (("on_policy_fraction", on_policy_fraction), ("sequence_kd_fraction", sequence_kd_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be a probability in [0, 1]")
    if on_policy_fraction + sequence_kd_fraction > 1.0 + 1e-9:
        raise ValueError(f"on_policy_fraction={on_policy_fraction} and sequence_kd_fraction={sequence_kd_fraction} "
                         "are probabilities of one draw per batch and add up to more than 1: lower one of them")
    if on_policy_fraction == 0.0 and sequence_kd_fraction == 0.0:
        return "data"
    generator = torch.Generator().manual_seed(step_seed(seed, step, 0))
    draw = torch.rand((), generator=generator).item()
    if draw < on_policy_fraction:
        return "student"
    if draw < on_policy_fraction + sequence_kd_fraction:
        return "teacher"
    return "data"


def _eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generate_continuations(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                           prompt_length: int, max_new_tokens: int | None = None, do_sample: bool = True,
                           temperature: float = 1.0, pad_token_id: int = 0, seed: int | None = None,
                           vocab_limit: int | None = None) -> dict[str, Tensor]:
    """A batch ``{input_ids, attention_mask, labels, generated}`` whose blocks keep their first ``prompt_length``
    tokens and continue with ``model``'s generation: ``model.generate(do_sample=..., max_new_tokens=...,
    temperature=..., top_k=0, pad_token_id=...)`` (sampling from the full distribution at ``temperature``, or greedy
    with ``do_sample=False``), the model in eval mode under ``no_grad`` (its mode restored after).

    ``labels`` are the tokens with ``-100`` on the prompt and on padding; a generation that ends with an
    end-of-sequence token keeps it and pads (attention mask 0) after it. ``max_new_tokens`` defaults to filling the
    block (``seq_len - prompt_length``); the result has ``prompt_length + max_new_tokens`` columns. A row whose prompt
    is not all real tokens (the padded last block of a corpus) keeps its own tokens and labels; ``generated`` (bool,
    one per row) says which rows were generated. ``seed`` fixes the samples without touching the global random state
    (``None``: the global random state). ``vocab_limit`` forbids token ids from it up (a model whose vocabulary is
    padded beyond the tokenizer's).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    if not 1 <= prompt_length < seq_len:
        raise ValueError(f"prompt_length={prompt_length} must be between 1 and seq_len - 1 = {seq_len - 1}: the prompt "
                         "is the first tokens of each block and the rest is generated")
    if max_new_tokens is None:
        max_new_tokens = seq_len - prompt_length
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    full = mask[:, :prompt_length].bool().all(1)
    width = prompt_length + max_new_tokens
    out_ids = torch.full((input_ids.shape[0], width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros_like(out_ids)
    copied = min(width, seq_len)
    out_ids[:, :copied], out_mask[:, :copied] = input_ids[:, :copied], mask[:, :copied]
    labels = out_ids.masked_fill(out_mask == 0, IGNORE_INDEX)
    if full.any():
        rows = full.nonzero(as_tuple=True)[0]
        prompts = input_ids[rows, :prompt_length]
        options: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
        if do_sample:
            options.update(temperature=temperature, top_k=0)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_limit is not None and vocab is not None and vocab > vocab_limit:
            options["suppress_tokens"] = list(range(vocab_limit, vocab))
        training = model.training
        model.eval()
        devices = [prompts.device] if prompts.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                sequences = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
        finally:
            model.train(training)
        new = sequences[:, prompt_length:prompt_length + max_new_tokens]
        new_mask = torch.ones_like(new)
        eos = _eos_ids(model)
        if eos:
            is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            new_mask = new_mask.masked_fill(after_eos, 0)
            new = new.masked_fill(after_eos, pad_token_id)
        generated_ids = torch.full((rows.numel(), max_new_tokens), pad_token_id, dtype=out_ids.dtype,
                                   device=out_ids.device)
        generated_mask = torch.zeros_like(generated_ids)
        generated_ids[:, :new.shape[1]], generated_mask[:, :new.shape[1]] = new, new_mask
        out_ids[rows] = torch.cat([prompts, generated_ids], 1)
        out_mask[rows] = torch.cat([torch.ones_like(prompts), generated_mask], 1)
        row_labels = out_ids[rows].masked_fill(out_mask[rows] == 0, IGNORE_INDEX)
        row_labels[:, :prompt_length] = IGNORE_INDEX
        labels[rows] = row_labels
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": labels, "generated": full}
