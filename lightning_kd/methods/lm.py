"""Distillation of causal language models: the teacher–student base on token batches, with token-level terms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from lightning_kd.features import capture_features
from lightning_kd.losses.token import valid_token_mask
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.terms import DistillationTerm, term_from_spec
from lightning_kd.terms.token import TokenKLTerm, token_normalizer

__all__ = ["LanguageModelKD", "TokenBatch", "adamw", "build_causal_lm", "vocab_size"]


@dataclass
class TokenBatch(Batch):
    """A language-model batch: ``input`` the token ids ``(B, T)``, ``target`` the labels aligned with them (``-100``:
    not counted; the prediction at ``t`` is scored on token ``t + 1``) and the ``attention_mask`` (1: a real token)."""

    attention_mask: Tensor | None = None


def adamw(params) -> torch.optim.Optimizer:
    """The default optimizer of :class:`LanguageModelKD`: AdamW with lr 1e-3, betas (0.9, 0.95), weight decay 0.01."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def build_causal_lm(model: str | dict | nn.Module, vocab: int | None = None) -> nn.Module:
    """A causal LM from ``"hf:<directory or hub id>"`` (:mod:`lightning_kd.models.hf`) or from a dict of
    ``tiny_causal_lm`` arguments (a small Llama-style model from a config; ``vocab`` fills in a missing
    ``vocab_size``); a module passes through."""
    if isinstance(model, nn.Module):
        return model
    from lightning_kd.models import hf

    if isinstance(model, dict):
        config = dict(model)
        if vocab is not None:
            config.setdefault("vocab_size", vocab)
        return hf.tiny_causal_lm(**config)
    if isinstance(model, str) and hf.is_hf_name(model):
        return hf.load_hf_model(model, task="causal_lm")
    raise ValueError(f"cannot build a language model from {model!r}: pass an nn.Module, 'hf:<directory or hub id>' "
                     "or a dict of tiny_causal_lm arguments, e.g. {'vocab_size': 256, 'hidden_size': 64, 'layers': 2, "
                     "'seed': 0}")


def vocab_size(model: nn.Module) -> int:
    """The number of logits a causal LM outputs (its LM head's outputs, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__}: give it get_output_embeddings() "
                         "or config.vocab_size")
    return int(size)


class LanguageModelKD(DistillationModule):
    """Knowledge distillation between causal language models: ``ce_weight`` × next-token cross-entropy plus token
    distillation terms (:mod:`lightning_kd.terms.token`), from a frozen teacher.

    By default one :class:`~lightning_kd.terms.TokenKLTerm` named ``kd`` with ``divergence``, ``temperature``,
    ``beta``, ``skew`` and weight ``kd_weight``: forward KL is word-level KD (Kim & Rush, EMNLP 2016), reverse KL
    MiniLLM's objective (Gu et al., ICLR 2024), ``"jsd"`` GKD's (Agarwal et al., ICLR 2024), the skew divergences
    DistiLLM's (Ko et al., ICML 2024). ``terms`` replaces it by any terms (e.g. ``TAIDTerm``, ``HiddenStateTerm``,
    ``AttentionRelationTerm``), each logged as ``train/loss_<term>_<loss>`` (``train/loss_kd`` for a loss named as
    its term). The cross-entropy and the token terms are normalised by the number of valid tokens of all ranks (see
    :mod:`lightning_kd.terms.token`); losses are computed in float32.

    Models are ``nn.Module`` s (Hugging Face causal LMs, called as ``model(input_ids=..., attention_mask=...)``),
    ``"hf:<directory or hub id>"`` or a dict of :func:`lightning_kd.models.hf.tiny_causal_lm` arguments (YAML:
    ``student: {vocab_size: 256, hidden_size: 64, layers: 2, seed: 0}``); names and dicts are stored in the
    hyper-parameters, so ``load_from_checkpoint`` rebuilds the models (modules must be passed again). The teacher
    stays in eval mode, gets no gradients and is left out of checkpoints unless ``save_teacher``.

    Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` (:class:`~lightning_kd.data.text.TextDataModule`)
    or :class:`TokenBatch`; without ``labels`` the input ids are the labels (padding left out).

    Validation and test log, over all valid tokens: ``<stage>/loss`` (mean next-token NLL), ``<stage>/bpb`` (bits
    per byte, ``loss / ln 2 × tokens_per_byte``), ``<stage>/ppl`` (``exp(loss)``), ``<stage>/acc`` (top-1 token
    accuracy) and with a teacher ``<stage>/agreement`` (same top-1 token as the teacher), ``<stage>/teacher_loss``,
    ``<stage>/teacher_bpb``, ``<stage>/teacher_ppl``.

    Args:
        student, teacher: the causal LMs (see above).
        num_classes: the vocabulary size; ``None``: the student's (or ``vocab_slice``). Checked against the models and
            the data module's ``num_classes``.
        terms: distillation terms by name (instances or specs ``{"class_path": ..., "init_args": ...}``); ``None``: the
            ``kd`` term from the arguments below.
        divergence, temperature, temperature_squared, beta, skew, chunked, chunk_size: the default term's
            (:class:`~lightning_kd.terms.TokenKLTerm`).
        kd_weight: the default term's weight.
        vocab_slice: compare only the first ``vocab_slice`` logits of both models (one model's vocabulary padded, e.g.
            to a multiple of 64, over a shared tokenizer).
        tokens_per_byte: tokens per byte of text, for ``bpb``; ``None``: the data module's ``tokens_per_byte``, else 1
            (byte-level tokens).
        optimizer: default AdamW (lr 1e-3, betas (0.9, 0.95), weight decay 0.01).
        **kwargs: the other arguments of :class:`~lightning_kd.methods.DistillationModule` (``ce_weight``,
            ``teacher_weights``, ``save_teacher``, ...). ``mix`` does not apply to tokens.
    """

    prefix_term_names = True
    hparams_ignore = ("terms",)
    requires_teacher = False  # without one, kd_weight=0 (or terms that need none) trains the student alone

    def __init__(
        self,
        student: str | dict | nn.Module,
        teacher: str | dict | nn.Module | None = None,
        *,
        num_classes: int | None = None,
        terms: dict[str, Any] | None = None,
        divergence: str = "forward_kl",
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        temperature_squared: bool = False,
        beta: float = 0.5,
        skew: float = 0.1,
        chunked: bool = False,
        chunk_size: int = 1024,
        vocab_slice: int | None = None,
        tokens_per_byte: float | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs,
    ):
        if kwargs.get("mix") is not None:
            raise ValueError(f"mix={kwargs['mix']!r} mixes images; token batches cannot be mixed: leave mix=None")
        if kwargs.get("channels_last"):
            raise ValueError("channels_last applies to 4-D image batches, not token batches: leave it False")
        if vocab_slice is not None and vocab_slice < 1:
            raise ValueError(f"vocab_slice={vocab_slice} must be a positive number of logits")
        super().__init__(student, teacher, num_classes=num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         **kwargs)
        self._check_vocabularies(num_classes, vocab_slice)
        if self.teacher is not None:
            self.teacher.eval()
        if terms is None and self.teacher is None and kd_weight != 0:
            raise ValueError("LanguageModelKD distils from a teacher: pass teacher=<nn.Module, 'hf:<dir>' or a "
                             "tiny_causal_lm dict>, or kd_weight=0 to train the student on the labels alone")
        if terms is None:
            if self.teacher is not None and kd_weight != 0:
                self.add_term("kd", TokenKLTerm(divergence, temperature, temperature_squared=temperature_squared,
                                                beta=beta, skew=skew, chunked=chunked, chunk_size=chunk_size,
                                                weight=kd_weight))
        else:
            if not isinstance(terms, dict):
                raise TypeError(f"terms is a {type(terms).__name__}: pass a dict of terms by name")
            for name, term in terms.items():
                self.add_term(name, term_from_spec(term, name))
        self.hparams["terms"] = None if terms is None else self.term_specs()
        self._hparams_initial["terms"] = self.hparams["terms"]

    # ----------------------------------------------------------------------------------------------- models
    @staticmethod
    def _build(model: str | dict | nn.Module, num_classes: int | None, in_chans: int) -> nn.Module:
        return build_causal_lm(model, num_classes)

    def _check_vocabularies(self, num_classes: int | None, vocab_slice: int | None) -> None:
        student_vocab = vocab_size(self.student)
        teacher_vocab = None if self.teacher is None else vocab_size(self.teacher)
        if vocab_slice is None and teacher_vocab is not None and teacher_vocab != student_vocab:
            raise ValueError(f"the student's vocabulary has {student_vocab} tokens but the teacher's has "
                             f"{teacher_vocab}: token distillation needs one tokenizer. If both share it and one pads "
                             f"its vocabulary, pass vocab_slice=<the tokenizer's size> (at most "
                             f"{min(student_vocab, teacher_vocab)}) to compare only the first logits")
        smallest = min(v for v in (student_vocab, teacher_vocab) if v is not None)
        if vocab_slice is not None and vocab_slice > smallest:
            raise ValueError(f"vocab_slice={vocab_slice} exceeds the smaller vocabulary ({smallest} tokens): use at "
                             f"most {smallest}")
        vocab = vocab_slice or student_vocab
        if num_classes is not None and num_classes != vocab:
            raise ValueError(f"num_classes={num_classes} but the models give {vocab} logits"
                             + (f" (vocab_slice={vocab_slice})" if vocab_slice else "")
                             + f": use num_classes={vocab} (or leave it out)")
        self.num_classes = vocab

    def term_specs(self) -> dict[str, dict[str, Any]]:
        """Each term's spec by name."""
        return {name: term.spec() for name, term in self.terms.items()}

    def add_term(self, name: str, term: DistillationTerm) -> DistillationTerm:
        """:meth:`DistillationModule.add_term`; parts sized by hooked features are built at once from a dry run on a
        short token sequence."""
        super().add_term(name, term)
        if not term.built:
            self._build_terms(None, [term])
        return term

    def _build_terms(self, input_shape: Sequence[int] | None, terms: list[DistillationTerm]) -> None:
        student_shapes = self._dry_run(self.student, [n for t in terms for n in t.student_layers])
        teacher_shapes = self._dry_run(self.teacher, [n for t in terms for n in t.teacher_layers])
        for term in terms:
            term._build([student_shapes[n] for n in term.student_layers],
                        [teacher_shapes[n] for n in term.teacher_layers])

    @staticmethod
    def _dry_run(model: nn.Module | None, layers: list[str]) -> dict[str, torch.Size]:
        layers = list(dict.fromkeys(layers))
        if not layers:
            return {}
        parameter = next(iter(model.parameters()))
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), capture_features(model, layers) as features:
                model(input_ids=torch.zeros(2, 4, dtype=torch.long, device=parameter.device))
        finally:
            for module, training in modes.items():
                module.training = training
        from lightning_kd.terms.token import _tensor

        return {name: _tensor(value).shape for name, value in features.items()}

    # ------------------------------------------------------------------------------------------------ batches
    @staticmethod
    def unpack_batch(batch: Any) -> TokenBatch:
        if isinstance(batch, TokenBatch):
            return batch
        if isinstance(batch, dict):
            if "input_ids" not in batch:
                raise ValueError(f"a language-model batch holds 'input_ids' (and 'attention_mask', 'labels'), got the "
                                 f"keys {sorted(batch)}")
            ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        elif isinstance(batch, Batch):
            ids, mask, labels = batch.input, None, batch.target
        else:
            ids, labels, mask = (list(batch) + [None, None])[:3]
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        return TokenBatch(ids, labels, attention_mask=mask)

    def _check_targets(self, target: Tensor, batch_idx: int) -> None:
        if target.device.type != "cpu" and batch_idx > 0:
            return
        if target.is_floating_point():
            raise ValueError(f"labels must be token ids (torch.long), but batch {batch_idx} holds {target.dtype}")
        counted = target[target != -100]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= self.num_classes):
            raise ValueError(f"labels must be token ids in [0, {self.num_classes - 1}] or -100 (left out), but batch "
                             f"{batch_idx} holds {int(counted.min())} to {int(counted.max())}: check the tokenizer "
                             "against the models' vocabulary")

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The student's logits ``(B, T, V)``."""
        return self._logits(self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))

    def _logits(self, output: Any) -> Tensor:
        logits = output if isinstance(output, Tensor) else output.logits
        vocab_slice = self.hparams.get("vocab_slice")
        return logits[..., :vocab_slice] if vocab_slice else logits

    def needs_dense_logits(self) -> bool:
        """Whether the step forms the full logits: always outside training; in training unless a term computes them
        chunk by chunk from the final hidden states and no other term reads them."""
        if not self.training:
            return True
        terms = list(self.terms.values())
        chunked = any(getattr(term, "chunked", False) for term in terms)
        return not chunked or any(getattr(term, "needs_dense_logits", term.reads_logits) for term in terms)

    def _run(self, model: nn.Module, layers: Sequence[str], batch: TokenBatch, dense: bool) -> ModelOutput:
        decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
        with capture_features(model, layers) as features:
            if dense or decoder is None:
                logits = self._logits(model(input_ids=batch.input, attention_mask=batch.attention_mask,
                                            use_cache=False))
            else:  # the trunk alone, its final hidden states hooked by the chunked term: no (B, T, V) logits
                decoder(input_ids=batch.input, attention_mask=batch.attention_mask, use_cache=False)
                logits = None
        return ModelOutput(logits, features)

    def forward_student(self, batch: Batch) -> ModelOutput:
        return self._run(self.student, self.student_layers, batch, self.needs_dense_logits())

    @torch.no_grad()
    def forward_teacher(self, batch: Batch) -> ModelOutput:
        if self.replay_teacher is not None and self.training:
            return ModelOutput(self.replay_teacher(batch))
        if self.teacher.training:
            self.teacher.eval()
        return self._run(self.teacher, self.teacher_layers, batch, self.needs_dense_logits())

    def _forward_pair(self, batch: Batch, batch_idx: int) -> tuple[ModelOutput, ModelOutput | None]:
        self._check_targets(batch.target, batch_idx)
        teacher_out = None if self.teacher is None else self.forward_teacher(batch)
        student_out = self.forward_student(batch)
        if student_out.logits is not None:
            self._check_outputs(student_out.logits, None if teacher_out is None else teacher_out.logits)
        return student_out, teacher_out

    # -------------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._training_step(self.unpack_batch(batch), batch_idx)

    def _training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        student_out, teacher_out = self._forward_pair(batch, batch_idx)
        ce = self.token_cross_entropy(batch, student_out)
        losses = {"ce": self.hparams.ce_weight * ce, **self.distillation_losses(batch, student_out, teacher_out)}
        return self.total_loss(losses, batch_idx)

    def token_cross_entropy(self, batch: TokenBatch, student_out: ModelOutput) -> Tensor:
        """Next-token cross-entropy in float32, summed over the valid tokens and divided by their number over all
        ranks (× the world size, see :mod:`lightning_kd.terms.token`); from the final hidden states chunk by chunk
        when the logits were not formed."""
        labels, mask = batch.target, batch.attention_mask
        if student_out.logits is not None:
            logits = student_out.logits[:, :-1].float()
            valid = valid_token_mask(tuple(batch.target.shape), labels, mask, shift=True, device=logits.device)
            targets = labels[:, 1:].to(logits.device).masked_fill(~valid, -100)
            count, world = token_normalizer(valid)
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            return world * total / count.clamp(min=1.0)
        hidden = self._final_hidden(student_out)
        valid = valid_token_mask(tuple(labels.shape), labels, mask, shift=True, device=hidden.device)
        count, world = token_normalizer(valid)
        rows_b, rows_t = valid.nonzero(as_tuple=True)
        rows = rows_b * hidden.shape[1] + rows_t
        targets = labels.to(hidden.device).reshape(-1).index_select(0, rows + 1).long()
        head = self.student.get_output_embeddings()
        weight, bias = head.weight, head.bias
        vocab_slice = self.hparams.get("vocab_slice")
        if vocab_slice:
            weight, bias = weight[:vocab_slice], None if bias is None else bias[:vocab_slice]
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunk = self._chunk_size()
        total = flat.new_zeros((), dtype=torch.float32) + 0.0 * flat.sum()
        for start in range(0, rows.numel(), chunk):
            total = total + checkpoint(_chunk_cross_entropy, flat, weight, bias, rows[start:start + chunk],
                                       targets[start:start + chunk], use_reentrant=False, preserve_rng_state=False)
        return world * total / count.clamp(min=1.0)

    def _chunk_size(self) -> int:
        sizes = [term.chunk_size for term in self.terms.values() if getattr(term, "chunked", False)]
        return min(sizes) if sizes else int(self.hparams.get("chunk_size") or 1024)

    def _final_hidden(self, student_out: ModelOutput) -> Tensor:
        from lightning_kd.terms.token import _tensor, final_hidden_layer

        name = final_hidden_layer(self.student)
        if name not in student_out.features:
            raise RuntimeError("the student's logits were skipped but its final hidden states were not captured")
        return _tensor(student_out.features[name])

    def _make_metrics(self) -> nn.ModuleDict:
        names = ["nll", "acc"] + (["teacher_nll", "agreement"] if self.teacher is not None else [])
        return nn.ModuleDict({name: MeanMetric() for name in names})

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        batch = self.unpack_batch(batch)
        student_out, teacher_out = self._forward_pair(batch, batch_idx)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        logits = student_out.logits[:, :-1].float()
        valid = valid_token_mask(tuple(batch.target.shape), batch.target, batch.attention_mask, shift=True,
                                 device=logits.device)
        if not valid.any():
            return
        targets = batch.target[:, 1:].to(logits.device)[valid]
        student = logits[valid]
        prediction = student.argmax(-1)
        metrics["nll"].update(F.cross_entropy(student, targets, reduction="none"))
        metrics["acc"].update((prediction == targets).float())
        if teacher_out is not None:
            teacher = teacher_out.logits[:, :-1].float()[valid]
            metrics["teacher_nll"].update(F.cross_entropy(teacher, targets, reduction="none"))
            metrics["agreement"].update((prediction == teacher.argmax(-1)).float())

    def tokens_per_byte(self) -> float:
        """Tokens per byte of text: the argument, else the data module's ``tokens_per_byte``, else 1."""
        value = self.hparams.get("tokens_per_byte")
        if value is None:
            value = getattr(getattr(self._trainer, "datamodule", None), "tokens_per_byte", None)
        return 1.0 if value is None else float(value)

    def _log_evaluation(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if not metrics["nll"].update_called:
            return
        scale = self.tokens_per_byte() / math.log(2.0)
        values = {"loss": metrics["nll"].compute(), "acc": metrics["acc"].compute()}
        values.update(bpb=values["loss"] * scale, ppl=values["loss"].exp())
        if "teacher_nll" in metrics:
            teacher = metrics["teacher_nll"].compute()
            values.update(agreement=metrics["agreement"].compute(), teacher_loss=teacher,
                          teacher_bpb=teacher * scale, teacher_ppl=teacher.exp())
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bpb", "acc"))
        for metric in metrics.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.unpack_batch(batch)
        return self(batch.input, batch.attention_mask)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.get("terms") is not None:
            checkpoint.setdefault("hyper_parameters", {})["terms"] = self.term_specs()


def _chunk_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(hidden.index_select(0, rows), weight, bias)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), targets, reduction="sum")
