"""Hugging Face ``transformers`` models as teachers and students: loading by ``hf:<local dir or hub id>``, tiny random
models for tests and demos, and what the chunked LM loss needs (final hidden states, the LM head, the vocabulary).

Weights are only read as safetensors or with ``weights_only=True``; nothing is downloaded unless a hub id is named
and the Hugging Face hub is reachable and not switched off (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["HF_PREFIX", "is_hf_name", "load_hf_model", "tiny_causal_lm", "tiny_encoder", "final_hidden_states",
           "lm_head", "lm_vocab_size", "check_vocab"]

HF_PREFIX = "hf:"
_TASKS = ("causal_lm", "encoder")
_TRUE = ("1", "true", "yes", "on")


def is_hf_name(name: str) -> bool:
    """Whether ``name`` names a Hugging Face model (``hf:<local dir or hub id>``)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def _offline() -> bool:
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _auto_class(task: str):
    if task not in _TASKS:
        raise ValueError(f"task={task!r}: choose 'causal_lm' (a model with an LM head) or 'encoder' (the bare model, "
                         "for intermediate-layer features)")
    import transformers

    return transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModel


def load_hf_model(name: str, task: str = "causal_lm", local_files_only: bool | None = None,
                  dtype: torch.dtype | str | None = None, **kwargs) -> nn.Module:
    """A ``transformers`` model from ``hf:<local dir>`` or ``hf:<hub id>`` (the prefix is optional here).

    ``task="causal_lm"`` loads ``AutoModelForCausalLM`` (teacher/student LMs), ``task="encoder"`` ``AutoModel``
    (e.g. BERT for intermediate-layer distillation). A local directory (as written by ``save_pretrained``) is read
    with ``local_files_only=True``, its safetensors preferred and any ``.bin`` file read with ``weights_only=True``.
    A hub id is looked up in the local cache and, unless ``local_files_only`` or ``HF_HUB_OFFLINE=1``, downloaded.
    ``dtype`` (e.g. ``torch.bfloat16``) and ``kwargs`` go to ``from_pretrained``.
    """
    source = name[len(HF_PREFIX):] if is_hf_name(name) else name
    if not source:
        raise ValueError(f"{name!r} names no model: write hf:<local directory> or hf:<hub id>")
    auto = _auto_class(task)
    options = dict(weights_only=True, **kwargs)
    if dtype is not None:
        options["dtype"] = dtype
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"{source!r} is not a model directory with a config.json: give the directory written "
                             "by model.save_pretrained(dir)")
        if any(path.glob("*.safetensors")):
            options["use_safetensors"] = True
        return auto.from_pretrained(str(path), local_files_only=True, **options)
    offline = _offline() if local_files_only is None else local_files_only
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"no model directory {source!r}: give the directory written by "
                                "model.save_pretrained(dir), or a hub id such as hf:<organisation>/<model>")
    try:
        return auto.from_pretrained(source, local_files_only=offline, **options)
    except OSError as error:
        how = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else f"downloading it failed ({type(error).__name__}: {str(error).splitlines()[0]})")
        raise OSError(
            f"{source!r} is neither a local directory nor in the Hugging Face cache, and {how}. Download it once "
            f"where the hub is reachable, e.g. `hf download {source} --local-dir DIR` or "
            f"`{auto.__name__}.from_pretrained('{source}').save_pretrained(DIR)`, then pass hf:DIR") from error


def _init_seeded(build, seed: int | None):
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_causal_lm(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                   arch: str = "llama", max_position_embeddings: int = 2048, intermediate_size: int | None = None,
                   seed: int | None = None) -> nn.Module:
    """A small randomly initialised causal LM built from a config (no files): ``arch="llama"`` (RMSNorm, rotary,
    SwiGLU, untied head) or ``"gpt2"`` (tied head). ``intermediate_size`` defaults to ``4 * hidden_size``; ``seed``
    fixes the weights without touching the global random state."""
    import transformers

    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of heads={heads}")
    intermediate_size = intermediate_size or 4 * hidden_size
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=heads,
                                          intermediate_size=intermediate_size,
                                          max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
        return _init_seeded(lambda: transformers.LlamaForCausalLM(config), seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                                         n_inner=intermediate_size, n_positions=max_position_embeddings)
        return _init_seeded(lambda: transformers.GPT2LMHeadModel(config), seed)
    raise ValueError(f"arch={arch!r}: choose 'llama' or 'gpt2'")


def tiny_encoder(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                 max_position_embeddings: int = 512, seed: int | None = None) -> nn.Module:
    """A small randomly initialised BERT encoder (``BertModel``) built from a config, for feature distillation."""
    import transformers

    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden_size,
                                     max_position_embeddings=max_position_embeddings)
    return _init_seeded(lambda: transformers.BertModel(config), seed)


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                        **kwargs) -> Tensor:
    """The ``(B, T, H)`` hidden states a causal LM feeds its LM head (after its final norm), computed by its base
    model without the head, so no ``(B, T, V)`` logits are formed: ``model(...).logits`` equals
    ``F.linear(final_hidden_states(model, ...), *lm_head(model))``."""
    base = getattr(model, "base_model", model)
    if base is model:
        raise ValueError(f"{type(model).__name__} has no base model under an LM head: pass a *ForCausalLM model")
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return outputs.last_hidden_state


def lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's ``(V, H)`` weight and ``(V,)`` bias (or ``None``) of a causal LM whose logits are a plain
    linear map of :func:`final_hidden_states` (an error names models that scale or soft-cap their logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no LM head: load it with task='causal_lm'")
    config = getattr(model, "config", None)
    for attribute, plain in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(config, attribute, plain)
        if value not in (plain, None):
            raise ValueError(f"{type(model).__name__} applies {attribute}={value} to its logits, so they are not "
                             "F.linear(hidden, weight, bias): use the dense logits path for this model")
    return head.weight, getattr(head, "bias", None)


def lm_vocab_size(model: nn.Module | int) -> int:
    """The number of logits a causal LM predicts per token (the rows of its LM head; may exceed the tokenizer's
    length when the vocabulary is padded)."""
    if isinstance(model, int):
        return model
    try:
        return int(lm_head(model)[0].shape[0])
    except ValueError:
        return int(model.config.vocab_size)


def check_vocab(student: nn.Module | int, teacher: nn.Module | int, vocab_slice: int | None = None) -> int:
    """The vocabulary size the student's and teacher's logits are compared over; an error when they differ.

    Token-level distillation compares the two distributions entry by entry, so both models must share a tokenizer.
    When they do but one pads its vocabulary (LM heads are often rounded up to a multiple of 64 or 128; the padded
    rows never appear in the data), pass ``vocab_slice=<n>`` (the tokenizer's ``len``, at most the smaller size) to
    compare ``logits[..., :n]`` (in the chunked loss: ``chunked_distillation_loss(..., vocab_slice=n)``).
    """
    s, t = lm_vocab_size(student), lm_vocab_size(teacher)
    if vocab_slice is not None:
        if not 0 < vocab_slice <= min(s, t):
            raise ValueError(f"vocab_slice={vocab_slice} must be in [1, {min(s, t)}] (the student predicts {s} tokens, "
                             f"the teacher {t})")
        return vocab_slice
    if s != t:
        raise ValueError(
            f"the student predicts {s} tokens but the teacher {t}: token-level distillation needs one vocabulary. If "
            f"both use the same tokenizer and one pads its vocabulary, pass vocab_slice=<the tokenizer's length, at "
            f"most {min(s, t)}> to compare logits[..., :vocab_slice]; models with different tokenizers cannot be "
            "compared token by token")
    return s
