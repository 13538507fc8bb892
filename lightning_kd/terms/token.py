"""Distillation terms for causal language models: token-level divergences of the next-token distributions (dense or
chunked from the final hidden states), TAID's adaptive interpolated teacher, TinyBERT's hidden-state loss and MiniLM
v2's self-attention relations.

Batches are token batches (:class:`~lightning_kd.methods.lm.TokenBatch`): ``input`` the token ids ``(B, T)``,
``target`` the labels aligned with them (``-100``: not counted) and ``attention_mask``. Logits are ``(B, T, V)``; the
prediction at position ``t`` is compared on token ``t + 1`` (causal shift).

Normalisation of the token terms: the sum over the valid predicted tokens of all ranks divided by their number (one
all-reduce of the count per term and step under ``torch.distributed``), times the world size, since DDP averages the
ranks' gradients: the gradient is that of the mean over every valid token of the global batch, however the tokens fall
on the ranks. Under gradient accumulation :class:`~lightning_kd.methods.LanguageModelKD` turns each micro-batch's
mean back into its token sum and divides the accumulated gradients by the token count of the whole step before the
optimizer steps, so the step's gradient is that of the mean over all its valid tokens, however they fall on the
micro-batches (the other losses of the step are then weighted by their micro-batch's token count).
The feature terms (:class:`HiddenStateTerm`, :class:`AttentionRelationTerm`) average over each rank's own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses.chunked import chunked_distillation_loss
from lightning_kd.losses.sparse import sparse_teacher, sparse_token_distillation_loss
from lightning_kd.losses.token import (DIVERGENCES, global_token_count, reduce_tokens, token_distillation_loss,
                                       valid_token_mask)
from lightning_kd.terms.base import DistillationTerm

if TYPE_CHECKING:
    from lightning_kd.methods.base import Batch, ModelOutput

__all__ = ["TokenKLTerm", "TAIDTerm", "HiddenStateTerm", "AttentionRelationTerm", "decoder_layer_names",
           "final_hidden_layer", "token_normalizer"]


# --------------------------------------------------------------------------------------------- model structure
def decoder_layer_names(model: nn.Module) -> list[str]:
    """Module names of a causal LM's decoder layers, in order: the longest ``nn.ModuleList`` of the model (e.g.
    ``model.layers.0 ..`` for Llama, Mistral and Qwen, ``transformer.h.0 ..`` for GPT-2)."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers: name the layers' modules "
                         "explicitly")
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{index}" for index in range(len(layers))]


def final_hidden_layer(model: nn.Module) -> str:
    """Module name of the layer whose output is the input of the LM head: the decoder's final norm (``model.norm``
    for Llama-style models, ``transformer.ln_f`` for GPT-2, ``gpt_neox.final_layer_norm``)."""
    names = dict(model.named_modules())
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    prefix = next((name for name, module in names.items() if module is decoder and name), None)
    candidates = ["norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm"]
    for candidate in ([f"{prefix}.{c}" for c in candidates] if prefix else []) + [
            "model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"]:
        if candidate in names:
            return candidate
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (tried {', '.join(candidates)} under its "
                     "decoder): the chunked token term reads the hidden states that enter the LM head; use "
                     "chunked=False")


def _tensor(output: Any) -> Tensor:
    """A hooked module's output as a tensor (decoder layers of older transformers return tuples)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"expected a hooked layer to output a tensor, got {type(output).__name__}")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def token_normalizer(valid: Tensor) -> tuple[Tensor, int]:
    """``(count, world_size)``: the number of ``valid`` tokens summed over all ranks, and the number of ranks. A rank's
    loss ``world_size * sum_rank / count`` has, after DDP's gradient averaging, the gradient of the global token
    mean."""
    return global_token_count(valid), _world_size()


def _attention_mask(batch: Batch) -> Tensor | None:
    return getattr(batch, "attention_mask", None)


# ------------------------------------------------------------------------------------------------ token terms
class TokenKLTerm(DistillationTerm):
    """A token-level divergence between the teacher's and the student's next-token distributions.

    ``L = s * sum_{valid t} D(p_t, q_t) / N`` with ``D`` one of :data:`lightning_kd.losses.token.DIVERGENCES`:
    ``"forward_kl"`` ``KL(p || q)`` (word-level KD, Kim & Rush, EMNLP 2016), ``"reverse_kl"`` ``KL(q || p)`` (MiniLLM,
    Gu et al., ICLR 2024), ``"jsd"`` the generalized JSD(``beta``) of GKD (Agarwal et al., ICLR 2024),
    ``"skew_forward_kl"`` / ``"skew_reverse_kl"`` with ``skew`` α of DistiLLM (Ko et al., ICML 2024), ``"tvd"``
    total variation; teacher ``p``, student ``q``, both at ``temperature``; ``s = T^2`` when
    ``temperature_squared``. ``N`` counts the valid tokens of all ranks (see the module docstring); a token is valid
    when its label is not ``ignore_index`` and its attention mask is set, and with ``shift`` the prediction at ``t``
    is scored on token ``t + 1``. Returns ``{"kd": L}``.

    With ``chunked=True`` the term reads the final hidden states of both models (their final norm's output, hooked
    by name) and their LM-head weights (from the host), and computes the logits ``chunk_size`` tokens at a time, each
    chunk recomputed in backward (:func:`lightning_kd.losses.chunked.chunked_distillation_loss`): same value and
    gradients, without ``(B, T, V)`` logits (the host then skips the models' LM heads in training when no other term
    reads logits). Teacher logits replayed from a cache are used as they are.

    Sparse teacher: with ``top_k`` the teacher's distribution is cut to its ``top_k`` largest probabilities plus one
    tail bucket and the student's collapsed to the same buckets (:mod:`lightning_kd.losses.sparse`); a teacher output
    carrying ``sparse = (values, indices)`` (replayed by :class:`~lightning_kd.lm_cache.TokenTeacherCache`) is used
    that way whatever ``top_k``. Not with ``chunked``.

    Args:
        divergence: the name of the divergence.
        temperature: softmax temperature of both distributions.
        temperature_squared: multiply by ``T^2`` (Hinton et al., 2015).
        beta: JSD's interpolation weight (GKD; 0.5: the ordinary JSD).
        skew: DistiLLM's α (0.1 in the paper).
        shift: score position ``t`` on token ``t + 1`` (causal LMs).
        ignore_index: the label of tokens left out.
        chunked: compute from hidden states chunk by chunk.
        chunk_size: tokens per chunk.
        top_k: compare over the teacher's top-``k`` tokens plus a tail bucket; ``None``: the full distributions.
    """

    reads_logits = True
    loss_name = "kd"

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0, *, temperature_squared: bool = False,
                 beta: float = 0.5, skew: float = 0.1, shift: bool = True, ignore_index: int = -100,
                 chunked: bool = False, chunk_size: int = 1024, top_k: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be a positive number of tokens (or None: the full distribution)")
        if top_k is not None and chunked:
            raise ValueError("top_k compares the student's logits with the teacher's top-k, but chunked=True never "
                             "forms them: use one of the two")
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}: use one of {', '.join(DIVERGENCES)}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if chunked and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
        if chunked and self.standardize:
            raise ValueError("standardize=True z-scores full logits, but chunked=True never forms them: use one of "
                             "the two")
        self.divergence = divergence
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.beta = beta
        self.skew = skew
        self.shift = shift
        self.ignore_index = ignore_index
        self.chunked = chunked
        self.chunk_size = chunk_size
        self.top_k = top_k

    @property
    def needs_dense_logits(self) -> bool:
        """Whether the term reads the full ``(B, T, V)`` logits in training."""
        return not self.chunked

    def bind(self, host) -> None:
        super().bind(host)
        if self.chunked and self.standardize:
            raise ValueError("the host standardizes logits, but chunked=True never forms them: pass standardize=False "
                             "to the chunked term")

    def layers(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        if not self.chunked:
            return [], []
        return [final_hidden_layer(student)], [final_hidden_layer(teacher)]

    def valid_tokens(self, batch: Batch, positions: Sequence[int], device: torch.device) -> Tensor:
        """The mask of the positions that count (shifted when ``shift``)."""
        return valid_token_mask(tuple(positions), batch.target, _attention_mask(batch), shift=self.shift,
                                ignore_index=self.ignore_index, device=device)

    def divergence_options(self) -> dict[str, Any]:
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta, skew=self.skew)

    def losses(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        return {self.loss_name: self.token_loss(batch, student_out, teacher_out, self.divergence_options())}

    def token_loss(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput,
                   options: dict[str, Any]) -> Tensor:
        """The reduced divergence with ``options`` (divergence, temperature, beta, skew)."""
        if self.top_k is not None or getattr(teacher_out, "sparse", None) is not None:
            return self.sparse_loss(batch, student_out, teacher_out, options)
        if self.chunked:
            return self._chunked_loss(batch, student_out, teacher_out, options)
        return self.dense_loss(batch, *self.logits(student_out, teacher_out), options)

    def dense_loss(self, batch: Batch, student_logits: Tensor, teacher_logits: Tensor,
                   options: dict[str, Any]) -> Tensor:
        """The reduced divergence of full ``(B, T, V)`` logits."""
        valid = self.valid_tokens(batch, student_logits.shape[:-1], student_logits.device)
        count, world = token_normalizer(valid)
        return world * token_distillation_loss(student_logits, teacher_logits, batch.target,
                                               mask=_attention_mask(batch), shift=self.shift,
                                               ignore_index=self.ignore_index, num_valid_tokens=count,
                                               scale_by_temperature_squared=self.temperature_squared, **options)

    def sparse_loss(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput,
                    options: dict[str, Any]) -> Tensor:
        """The reduced divergence against the sparse teacher: replayed ``teacher_out.sparse``, else the top-``top_k``
        of the teacher's logits."""
        if self.chunked:
            raise ValueError("a sparse teacher (top_k or replayed top-k outputs) needs the student's logits: use "
                             "chunked=False")
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        sparse = getattr(teacher_out, "sparse", None)
        if sparse is None:
            k = min(self.top_k, teacher_logits.shape[-1])
            sparse = sparse_teacher(teacher_logits.detach(), k, options["temperature"])
        values, indices = sparse
        valid = self.valid_tokens(batch, student_logits.shape[:-1], student_logits.device)
        count, world = token_normalizer(valid)
        return world * sparse_token_distillation_loss(student_logits, values, indices, batch.target,
                                                      mask=_attention_mask(batch), shift=self.shift,
                                                      ignore_index=self.ignore_index, num_valid_tokens=count,
                                                      scale_by_temperature_squared=self.temperature_squared,
                                                      **options)

    def _chunked_loss(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput,
                      options: dict[str, Any]) -> Tensor:
        host = self.host
        (student_hidden,) = [_tensor(f) for f in self.student_features(student_out)]
        student_weight, student_bias = _head(host.student)
        teacher = {}
        if all(name in teacher_out.features for name in self.teacher_layers):
            (teacher_hidden,) = [_tensor(f) for f in self.teacher_features(teacher_out)]
            teacher_weight, teacher_bias = _head(host.teacher)
            teacher = dict(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_weight,
                           teacher_head_bias=teacher_bias)
        elif teacher_out.logits is not None:  # replayed from a cache
            teacher = dict(teacher_logits=teacher_out.logits)
        else:
            raise ValueError("the chunked token term got neither the teacher's final hidden states nor its logits")
        valid = self.valid_tokens(batch, student_hidden.shape[:-1], student_hidden.device)
        count, world = token_normalizer(valid)
        vocab_slice = host.hparams.get("vocab_slice")
        if vocab_slice is None and "teacher_logits" in teacher:
            vocab_slice = teacher["teacher_logits"].shape[-1]
        losses = chunked_distillation_loss(
            student_hidden, student_weight, labels=batch.target, mask=_attention_mask(batch),
            student_head_bias=student_bias, shift=self.shift, ignore_index=self.ignore_index,
            num_valid_tokens=count, compute_ce=False, vocab_slice=vocab_slice, chunk_size=self.chunk_size,
            scale_by_temperature_squared=self.temperature_squared, **teacher, **options)
        return world * losses.distillation


def _head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of a causal LM's output layer."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear LM head (get_output_embeddings()): use chunked=False")
    return head.weight, head.bias


class TAIDTerm(TokenKLTerm):
    """TAID, temporally adaptive interpolated distillation (Shing et al., "TAID: Temporally Adaptive Interpolated
    Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025).

    The target is the intermediate distribution ``p_t = softmax((1 - t) * sg(z_s) + t * z_t)`` of the detached student
    logits ``z_s`` and the teacher logits ``z_t``; the loss is the forward KL ``KL(p_t || q)`` per token (reduced as
    :class:`TokenKLTerm`). After each optimizer step ``t`` moves towards 1 (the paper's Algorithm 1): with the
    step's loss ``J_n``, ``δ_n = (J_{n-1} - J_n) / (J_{n-1} + ε)``, momentum ``m_n = β m_{n-1} + (1 - β) δ_n`` and
    ``t_{n+1} = min(t_end, max(t_lin(n + 1), t_n + α σ(m_n) (1 - t_n)))``, where ``t_lin`` rises linearly from
    ``t_start`` to ``t_end`` over ``total_steps``. Defaults are the paper's: ``t_start = 0.4``, ``t_end = 1``,
    ``α = 5e-4``, ``β = 0.99``. ``t``, the momentum and the last loss are buffers (saved in checkpoints) and logged as
    ``train/taid_t``. Returns ``{"kd": L}``.

    Args:
        t_start, t_end: the interpolation's first value and its ceiling.
        alpha: step size α of the adaptive update.
        momentum: β of the momentum of the relative loss change.
        total_steps: steps of the linear floor ``t_lin``; ``None``: the trainer's estimated number of optimizer steps.
        adaptive: ``False`` follows ``t_lin`` alone.
        temperature, shift, ignore_index, chunked, chunk_size: as in :class:`TokenKLTerm` (``chunked`` needs teacher
            logits replayed from a cache or dense logits; the interpolation is formed on logits).
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, *, alpha: float = 5e-4, momentum: float = 0.99,
                 total_steps: int | None = None, adaptive: bool = True, temperature: float = 1.0,
                 shift: bool = True, ignore_index: int = -100, **kwargs):
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"TAID needs 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if kwargs.get("chunked"):
            raise ValueError("TAIDTerm interpolates full logits: chunked=True is not supported")
        if kwargs.get("top_k") is not None:
            raise ValueError("TAIDTerm interpolates full logits: leave top_k=None")
        super().__init__("forward_kl", temperature, shift=shift, ignore_index=ignore_index, **kwargs)
        self.t_start, self.t_end, self.alpha, self.momentum = t_start, t_end, alpha, momentum
        self.total_steps, self.adaptive = total_steps, adaptive
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("momentum_value", torch.tensor(0.0))
        self.register_buffer("previous_loss", torch.tensor(float("nan")))
        self._last_loss: Tensor | None = None

    def interpolated_logits(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``(1 - t) * sg(z_s) + t * z_t``, in float32."""
        t = self.t.to(student_logits.device)
        return (1.0 - t) * student_logits.detach().float() + t * teacher_logits.float()

    def losses(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        target = self.interpolated_logits(student_logits, teacher_logits)
        loss = self.dense_loss(batch, student_logits, target, self.divergence_options())
        if self.training:
            self._last_loss = loss.detach()
        return {self.loss_name: loss}

    def linear_t(self, step: int) -> float:
        """The linear floor ``t_start + (t_end - t_start) * step / total_steps``."""
        total = self.total_steps
        if total is None:
            trainer = getattr(self.host, "_trainer", None)
            total = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
        if not total or not math.isfinite(float(total)):
            return self.t_start
        return min(self.t_start + (self.t_end - self.t_start) * step / float(total), self.t_end)

    def update(self, loss: Tensor | float, step: int) -> None:
        """One step of the schedule after the loss ``J_n`` of optimizer step ``step`` (0-based)."""
        loss = torch.as_tensor(loss, dtype=torch.float32, device=self.t.device).clone()
        if _world_size() > 1:  # every rank follows the same schedule: that of the ranks' mean loss
            torch.distributed.all_reduce(loss)
            loss /= _world_size()
        floor = self.linear_t(step + 1)
        if self.adaptive:
            previous = self.previous_loss
            delta = torch.where(torch.isnan(previous), torch.zeros_like(loss), (previous - loss) / (previous + 1e-8))
            self.momentum_value.mul_(self.momentum).add_((1.0 - self.momentum) * delta)
            proposed = self.t + self.alpha * torch.sigmoid(self.momentum_value) * (1.0 - self.t)
            self.t.copy_(proposed.clamp(min=floor).clamp(max=self.t_end))
            self.previous_loss.copy_(loss)
        else:
            self.t.fill_(min(floor, self.t_end))

    def on_train_batch_end(self) -> None:
        if self._last_loss is None:
            return
        host = self.host
        self.update(self._last_loss, host.global_step - 1)
        self._last_loss = None
        if getattr(host, "_trainer", None) is not None:
            host.log("train/taid_t", self.t.detach().clone())


# --------------------------------------------------------------------------------------------- feature terms
def _layer_pairs(layer_map: dict | Sequence | None, student_count: int, teacher_count: int) -> list[tuple[int, int]]:
    if layer_map is None:  # TinyBERT's uniform map g(m) = m * N / M over the layers' outputs (1-based)
        return [(m, (m + 1) * teacher_count // student_count - 1) for m in range(student_count)]
    items = layer_map.items() if isinstance(layer_map, dict) else layer_map
    pairs = []
    for item in items:
        try:
            student_index, teacher_index = (int(value) for value in item)
        except (TypeError, ValueError):
            raise ValueError(f"layer_map entries must be pairs of layer indices, got {item!r}: pass "
                             "{student_layer: teacher_layer, ...} or [[student_layer, teacher_layer], ...]") from None
        pairs.append((student_index, teacher_index))
    if not pairs:
        raise ValueError("layer_map is empty: map at least one student layer to a teacher layer, or pass None for "
                         "the uniform map")
    for student_index, teacher_index in pairs:
        if not (0 <= student_index < student_count and 0 <= teacher_index < teacher_count):
            raise ValueError(f"layer_map pairs student layer {student_index} with teacher layer {teacher_index}, but "
                             f"the student has {student_count} decoder layers (0..{student_count - 1}) and the "
                             f"teacher {teacher_count} (0..{teacher_count - 1})")
    return pairs


def _layer_index(index: int, count: int, role: str) -> int:
    if not -count <= index < count:
        raise ValueError(f"the {role} has {count} decoder layers, so {role}_layer={index} is out of range "
                         f"(0..{count - 1}, or negative from the end)")
    return index % count


def _token_mask(batch: Batch, shape: Sequence[int], device: torch.device) -> Tensor:
    mask = _attention_mask(batch)
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    return mask.to(device).bool()


class HiddenStateTerm(DistillationTerm):
    """TinyBERT's hidden-state loss (Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding",
    Findings of EMNLP 2020, Eq. 8): ``sum_(m, n) MSE(H_S^m W_m, H_T^n)`` over the pairs of the layer map.

    ``H^m`` is the output of decoder layer ``m`` (0-based, hooked by module name), ``W_m`` a learned linear map from
    the student's to the teacher's hidden size (``projectors[i]``, one per pair, sized from the hooked shapes). The
    mean squared error is averaged over the hidden size and the tokens whose attention mask is set. The default map is
    TinyBERT's uniform one, student layer ``m`` to teacher layer ``(m + 1) N / M - 1`` (``M`` student layers, ``N``
    teacher layers). Returns ``{"hidden": L}``.

    Args:
        layer_map: ``{student_layer: teacher_layer}`` (keys may be strings, as in YAML) or a list of pairs; ``None``:
            the uniform map.
    """

    needs_shapes = True

    def __init__(self, layer_map: dict[str, int] | list[list[int]] | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(layer_map, dict):  # stored with string keys, so that the spec stays YAML/JSON-able
            self._init_args["layer_map"] = {str(key): int(value) for key, value in layer_map.items()}
        self.layer_map = layer_map
        self.pairs: list[tuple[int, int]] = []
        self.projectors = nn.ModuleList()

    def layers(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        student_names, teacher_names = decoder_layer_names(student), decoder_layer_names(teacher)
        self.pairs = _layer_pairs(self.layer_map, len(student_names), len(teacher_names))
        return [student_names[m] for m, _ in self.pairs], [teacher_names[n] for _, n in self.pairs]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.projectors = nn.ModuleList(nn.Linear(s[-1], t[-1]) for s, t in zip(student_shapes, teacher_shapes))

    def losses(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        total = None
        for projector, student, teacher in zip(self.projectors, self.student_features(student_out),
                                               self.teacher_features(teacher_out)):
            student, teacher = _tensor(student), _tensor(teacher).detach()
            error = (projector(student.float()) - teacher.float()).pow(2).mean(-1)
            valid = _token_mask(batch, error.shape, error.device)
            loss = reduce_tokens(error, valid)
            total = loss if total is None else total + loss
        return {"hidden": total}


def _relation_log_probs(x: Tensor, heads: int, key_mask: Tensor, causal: bool, role: str) -> Tensor:
    """``log softmax(x_a x_a^T / sqrt(d_r))`` per relation head ``a``: ``(B, T, D)`` → ``(B, heads, T, T)``."""
    batch, length, dim = x.shape
    if dim % heads:
        raise ValueError(f"the {role}'s projection has {dim} features, not divisible into relation_heads={heads}: "
                         "choose relation_heads dividing the query, key and value sizes of both models")
    x = x.float().reshape(batch, length, heads, dim // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(dim // heads)
    allowed = key_mask[:, None, None, :].expand(batch, heads, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min / 4)
    return F.log_softmax(scores, dim=-1)


class AttentionRelationTerm(DistillationTerm):
    """MiniLM v2's multi-head self-attention relation distillation (Wang et al., "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation for Compressing Pretrained Transformers", Findings of ACL 2021, Eq. 4–6).

    For each of the queries, keys and values ``A`` of one student and one teacher layer (outputs of ``q_proj``,
    ``k_proj``, ``v_proj``, or BERT's ``query``, ``key``, ``value``, hooked by name; before rotary embedding), split into ``relation_heads`` heads of size
    ``d_r``: ``R = softmax(A_a A_a^T / sqrt(d_r))`` per head; the loss is
    ``sum_{A in Q, K, V} mean_{a, t} KL(R_T[a, t] || R_S[a, t])``, the mean over relation heads and the query tokens
    whose attention mask is set. The relations are ``T × T`` whatever the hidden sizes, so the models may differ in
    width and head count; only ``relation_heads`` must divide each projection's size. ``causal`` restricts each
    token's relations to itself and the tokens before it (what a causal LM's attention sees); padded keys are left
    out. Defaults: the last layer of each model (the paper's choice for base-size teachers). Returns
    ``{"relation": L}``.

    Args:
        student_layer, teacher_layer: decoder layer indices (negative: from the end).
        relation_heads: number of relation heads (the paper uses 48 for large and 12 for base-size teachers).
        causal: mask relations to later tokens (``False`` for bidirectional encoders such as BERT, the paper's).
    """

    #: module names of the query, key and value projections: Llama/Mistral/Qwen's, then BERT's
    PROJECTIONS = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))

    def __init__(self, student_layer: int = -1, teacher_layer: int = -1, *, relation_heads: int = 8,
                 causal: bool = True, **kwargs):
        super().__init__(**kwargs)
        if relation_heads < 1:
            raise ValueError(f"relation_heads={relation_heads} must be a positive number of heads")
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.relation_heads, self.causal = relation_heads, causal

    def _projections(self, model: nn.Module, index: int, role: str) -> list[str]:
        layers = decoder_layer_names(model)
        layer = layers[_layer_index(index, len(layers), role)]
        names = [name for name, _ in model.get_submodule(layer).named_modules()]
        found = []
        for aliases in self.PROJECTIONS:
            matches = next((found for found in ([name for name in names if name.split(".")[-1] == alias]
                                                for alias in aliases) if found), [])
            if len(matches) != 1:
                raise ValueError(f"{role} layer {layer!r} ({type(model).__name__}) has no single "
                                 f"{' or '.join(repr(a) for a in aliases)} module (separate query/key/value "
                                 "projections as in Llama, Mistral, Qwen or BERT): AttentionRelationTerm reads their "
                                 "outputs")
            found.append(f"{layer}.{matches[0]}")
        return found

    def layers(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        return (self._projections(student, self.student_layer, "student"),
                self._projections(teacher, self.teacher_layer, "teacher"))

    def losses(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        total = None
        for student, teacher in zip(self.student_features(student_out), self.teacher_features(teacher_out)):
            student, teacher = _tensor(student), _tensor(teacher).detach()
            valid = _token_mask(batch, student.shape[:2], student.device)
            log_s = _relation_log_probs(student, self.relation_heads, valid, self.causal, "student")
            log_t = _relation_log_probs(teacher, self.relation_heads, valid, self.causal, "teacher")
            kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, heads, T)
            rows = valid[:, None, :].expand_as(kl)
            loss = reduce_tokens(kl, rows)
            total = loss if total is None else total + loss
        return {"relation": total}
