"""The teacher–student base every distillation method derives from."""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_kd.data.mixing import MIX_MODES, mix_images
from lightning_kd.features import capture_features, check_layers, feature_shapes, infer_input_shape, stage_pairs
from lightning_kd.losses import standardize_logits
from lightning_kd.metrics import Agreement, TeacherStudentKL
from lightning_kd.models import create_model
from lightning_kd.terms.base import DistillationTerm, warmup_factor
from lightning_kd.models.weights import extract_state_dict, load_checkpoint, load_weights  # noqa: F401

# The frozen teacher is in eval mode on purpose; Lightning warns about every eval-mode module at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

IGNORE_INDEX = -100


def class_dim(logits: Tensor) -> int:
    """Where the classes are: dim 1 of ``[B, C]`` and ``[B, C, H, W]`` logits, the last dim of ``[B, T, V]``."""
    return logits.dim() - 1 if logits.dim() == 3 else 1


@dataclass
class Batch:
    """One batch: ``input``, integer class ``target`` and, when the data provides them, the samples' ``index``,
    further ``views`` of the same samples by name (e.g. ``"strong"``, a strongly augmented view) and, for per-pixel or
    per-token targets, a boolean ``mask`` of the positions to learn from (besides those labelled ``-100``)."""

    input: Tensor
    target: Tensor
    index: Tensor | None = None
    views: dict[str, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None


@dataclass
class ModelOutput:
    """What a forward pass of student or teacher gives the method: ``logits`` and named ``features``."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


def sgd(params) -> torch.optim.Optimizer:
    """The default optimizer: SGD with lr 0.05, momentum 0.9 and weight decay 5e-4 (the CIFAR KD recipe); fused into
    one kernel when every parameter is on a CUDA device, else the multi-tensor (``foreach``) implementation."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused or None)


class DistillationModule(L.LightningModule):
    """A student trained with cross-entropy plus the named losses its method returns, from a frozen teacher.

    Args:
        student: the model to train: an ``nn.Module`` or a name for :func:`lightning_kd.models.create_model`.
        teacher: the frozen model to learn from, likewise. It stays in eval mode, gets no gradients, is never
            optimized and is left out of checkpoints unless ``save_teacher``.
        num_classes: number of classes; models built by name get this many outputs (linked from the data
            module by the CLI).
        in_chans: input channels of models built by name (linked from the data module by the CLI).
        teacher_weights: a Lightning checkpoint, a plain state dict, or a dict holding the weights under
            ``"model"``/``"state_dict"``, loaded strictly into the teacher.
        ce_weight: weight of the cross-entropy with the labels.
        optimizer: builds the optimizer from the trainable parameters (student and the method's own modules).
        lr_scheduler: builds an epoch-wise scheduler from the optimizer; none by default.
        save_teacher: also write the teacher's weights into checkpoints.
        check_finite: stop with an error naming the step and the losses when the loss is not finite. On the CPU
            every step is checked; on accelerators a flag kept on the device is read every ``log_every_n_steps``
            steps and before validation, so that no step waits for the host.
        channels_last: keep student, teacher and their 4-D inputs in the channels-last memory format (faster
            convolutions under mixed precision on tensor-core GPUs).
        compile: run student and teacher through ``torch.compile``, each compiled on its own (the teacher under
            ``no_grad``); for methods that distil from logits (hooked layers are not compiled).
        standardize: z-score student and teacher logits over classes before every logit term's loss (logit
            standardization, Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024); a term's own
            ``standardize`` overrides it. The paper pairs it with a lower base temperature and a larger KD weight
            (e.g. KD: T=2, weight 9 on CIFAR-100); set those in the config.
        mix: ``"mixup"`` or ``"cutmix"``: consistent teaching, as in function matching (Beyer et al., "Knowledge
            distillation: A good teacher is patient and consistent", CVPR 2022): every training batch is mixed on
            its device (:mod:`lightning_kd.data.mixing`, one coefficient λ per batch, folded to λ ≥ ½) before the
            teacher and the student both see it. The cross-entropy then uses the mixed labels,
            ``λ · CE(s, y) + (1 − λ) · CE(s, y_partner)`` (function matching itself uses no labels:
            ``ce_weight=0``); a loss that reads the labels (DKD, RLD) gets ``batch.target``, the label of the image
            with the larger share. :attr:`mixing` describes the current batch's mixing. Validation and test batches
            are not mixed. ``None``: no mixing.
        mix_alpha: concentration α of ``λ ~ Beta(α, α)``; 1 (λ uniform) is the paper's setting (big_vision's
            distillation configs: ``mixup = dict(p=1.0, n=2)``).
        input_shape: shape of one input, e.g. ``(3, 32, 32)``, for terms whose trainable parts are sized by hooked
            features: they are built from one dry forward pass on this shape, here when given, else in ``setup``
            from the first sample of the data (the shape is then stored in the hyper-parameters, so that
            ``load_from_checkpoint`` rebuilds the parts before their weights load).

    Mixed precision is the ``Trainer``'s ``precision`` (e.g. ``"bf16-mixed"``); losses are computed in float32.

    A method adds its losses as terms (:class:`~lightning_kd.terms.DistillationTerm`, :meth:`add_term`) in its
    ``__init__``, or overrides :meth:`distillation_losses` and returns its weighted losses by name; the base adds
    ``ce``, sums them, and logs ``train/loss`` and ``train/loss_<name>`` for each. The layers all terms read are
    hooked once per forward pass.
    """

    #: log each term's losses as ``<term>_<loss>`` (:class:`Distiller`) instead of by the loss's own name
    prefix_term_names = False
    #: constructor arguments kept out of the saved hyper-parameters (besides modules and optimizer factories)
    hparams_ignore: tuple[str, ...] = ()

    requires_teacher = True
    #: layers hooked by :meth:`forward_student` / :meth:`forward_teacher`: the union of :meth:`use_features`' and the
    #: terms' layers
    student_layers: tuple[str, ...] | list[str] = ()
    teacher_layers: tuple[str, ...] | list[str] = ()

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | None = None,
        *,
        num_classes: int,
        in_chans: int = 3,
        teacher_weights: str | None = None,
        ce_weight: float = 1.0,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        save_teacher: bool = False,
        check_finite: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        standardize: bool = False,
        mix: str | None = None,
        mix_alpha: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if mix is not None and mix not in MIX_MODES:
            raise ValueError(f"unknown mix={mix!r}: use one of {', '.join(MIX_MODES)}, or None for no mixing")
        if not mix_alpha > 0:
            raise ValueError(f"mix_alpha={mix_alpha} must be positive (it is the α of Beta(α, α))")
        modules = [name for name, value in (("student", student), ("teacher", teacher)) if isinstance(value, nn.Module)]
        # optimizer factories stay out of the checkpoint so that it loads with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=[*modules, "optimizer", "lr_scheduler", *self.hparams_ignore])
        if teacher is None and self.requires_teacher:
            raise ValueError(f"{type(self).__name__} needs a teacher: pass teacher=<nn.Module or model name> "
                             "(and teacher_weights=<path> for a model built by name)")
        if teacher is None and teacher_weights is not None:
            raise ValueError("teacher_weights was given without a teacher: pass teacher=<model name> as well")
        self.num_classes = num_classes
        self.student = self._build(student, num_classes, in_chans)
        self.teacher = None if teacher is None else self._build(teacher, num_classes, in_chans)
        if self.teacher is not None:
            if teacher_weights is not None:
                load_weights(self.teacher, teacher_weights)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self._outputs_checked = False
        #: set by :class:`lightning_kd.cache.TeacherOutputCache`: gives the teacher's logits for a training batch
        self.replay_teacher: Callable[[Batch], Tensor] | None = None
        self._compiled: dict[str, Any] = {}
        #: per list of loss names: [first bad global step or -1, then 1 for each loss that was non-finite there]
        self._nonfinite: dict[tuple[str, ...], Tensor] = {}
        #: the method's distillation terms by name (:meth:`add_term`)
        self.terms = nn.ModuleDict()
        self._method_layers: tuple[list[str], list[str]] = ([], [])
        #: how the current training batch was mixed (a :class:`lightning_kd.data.mixing.Mixing`); ``None`` outside
        #: mixed training steps
        self.mixing = None

    @staticmethod
    def _build(model: nn.Module | str, num_classes: int, in_chans: int) -> nn.Module:
        if isinstance(model, str):
            return create_model(model, num_classes=num_classes, in_chans=in_chans)
        if isinstance(model, nn.Module):
            return model
        raise TypeError(f"expected an nn.Module or a model name, got {type(model).__name__}")

    def _make_metrics(self) -> nn.ModuleDict:
        metrics = {"acc": MulticlassAccuracy(self.num_classes, average="micro"),
                   "ece": MulticlassCalibrationError(self.num_classes, n_bins=15)}
        if self.num_classes >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        if self.teacher is not None:
            metrics["teacher_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["teacher_ece"] = MulticlassCalibrationError(self.num_classes, n_bins=15)
            metrics["agreement"] = Agreement()
            metrics["kl"] = TeacherStudentKL()
        return nn.ModuleDict(metrics)

    # ----------------------------------------------------------------------------------------------- teacher
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits."""
        return self.student(x)

    def use_features(self, student_layers: str | list[str], teacher_layers: str | list[str] = ()) -> None:
        """Capture these layers (names as in ``named_modules()``, see :mod:`lightning_kd.features`) in every
        forward pass: ``ModelOutput.features`` then maps each name to its output, in this order. Checked now; a
        wrong name raises ``ValueError`` listing the model's module names."""
        self._method_layers = (check_layers(self.student, student_layers, "student"),
                               [] if self.teacher is None else check_layers(self.teacher, teacher_layers, "teacher"))
        self._refresh_layers()

    def _refresh_layers(self) -> None:
        """Hooked layers = the union of the method's own (:meth:`use_features`) and every term's, each once."""
        student, teacher = list(self._method_layers[0]), list(self._method_layers[1])
        for term in self.terms.values():
            student += term.student_layers
            teacher += term.teacher_layers
        self.student_layers, self.teacher_layers = list(dict.fromkeys(student)), list(dict.fromkeys(teacher))

    # ------------------------------------------------------------------------------------------------- terms
    def add_term(self, name: str, term: DistillationTerm) -> DistillationTerm:
        """Add a distillation term under ``name`` (its losses are logged as ``train/loss_<loss>``, or
        ``train/loss_<name>_<loss>`` when :attr:`prefix_term_names`). Its layers are checked and hooked; parts sized
        by them are built now when ``input_shape`` is known, else in :meth:`setup`."""
        if not isinstance(term, DistillationTerm):
            raise TypeError(f"term {name!r} is a {type(term).__name__}, not a lightning_kd.terms.DistillationTerm")
        if not name.isidentifier():
            raise ValueError(f"term name {name!r} must be a Python identifier (letters, digits, underscores): it "
                             "names the term's weights in checkpoints and its losses in the logs")
        if name in self.terms:
            raise ValueError(f"{type(self).__name__} already has a term named {name!r}: give each term its own name")
        term.bind(self)
        check_layers(self.student, term.student_layers, "student")
        if self.teacher is not None:
            check_layers(self.teacher, term.teacher_layers, "teacher")
        self.terms[name] = term
        self._refresh_layers()
        if not term.built and self.hparams.get("input_shape") is not None:
            self._build_terms(self.hparams.input_shape, [term])
        return term

    def _pending_terms(self) -> list[DistillationTerm]:
        return [term for term in self.terms.values() if not term.built]

    def _build_terms(self, input_shape: Sequence[int], terms: list[DistillationTerm]) -> None:
        """Build ``terms`` from one dry forward pass per model over the union of their layers."""
        student_layers = list(dict.fromkeys(name for term in terms for name in term.student_layers))
        teacher_layers = list(dict.fromkeys(name for term in terms for name in term.teacher_layers))
        student_shapes = feature_shapes(self.student, student_layers, input_shape)
        teacher_shapes = feature_shapes(self.teacher, teacher_layers, input_shape) if teacher_layers else {}
        for term in terms:
            term._build([student_shapes[name] for name in term.student_layers],
                        [teacher_shapes[name] for name in term.teacher_layers])

    def use_stage_pairs(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None) -> None:
        """:meth:`use_features` for methods that pair student and teacher layers in order: by default each
        model's stages after the stem; the two lists must be equally long."""
        self.use_features(*stage_pairs(self.student, self.teacher, student_layers, teacher_layers, type(self).__name__))

    def _input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last and x.dim() == 4 else x

    def forward_student(self, batch: Batch) -> ModelOutput:
        student = self._compiled.get("student", self.student)
        with capture_features(self.student, self.student_layers) as features:
            logits = student(self._input(batch.input))
        return ModelOutput(logits, features)

    @torch.no_grad()
    def forward_teacher(self, batch: Batch) -> ModelOutput:
        if self.replay_teacher is not None and self.training:
            return ModelOutput(self.replay_teacher(batch))
        if self.teacher.training:  # Trainer.fit restores the modes sub-modules had when it started
            self.teacher.eval()
        teacher = self._compiled.get("teacher", self.teacher)
        with capture_features(self.teacher, self.teacher_layers) as features:
            logits = teacher(self._input(batch.input))
        return ModelOutput(logits, features)

    # ------------------------------------------------------------------------------------------------ method
    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        """The method's weighted losses by name (without cross-entropy, which the base adds): by default, those of
        its terms."""
        losses: dict[str, Tensor] = {}
        for term_name, term in self.terms.items():
            for loss_name, value in term(batch, student_out, teacher_out).items():
                key = self.loss_name(term_name, loss_name)
                if key in losses or key == "ce":
                    raise ValueError(f"two losses of {type(self).__name__} are both named {key!r}: give the terms "
                                     "distinct names (Distiller logs each as <term>_<loss>)")
                losses[key] = value
        return losses

    def loss_name(self, term_name: str, loss_name: str) -> str:
        """The name a term's loss is logged under: the loss's own name, or ``<term>_<loss>`` (just ``<term>`` when
        they are equal) when :attr:`prefix_term_names`."""
        if not self.prefix_term_names:
            return loss_name
        return term_name if loss_name == term_name else f"{term_name}_{loss_name}"

    def warmup_ramp(self, warmup_epochs: int) -> float:
        """Linear warm-up factor ``min(epoch / warmup_epochs, 1)`` with epochs counted from 1 (as in the DKD
        reference code); 1 when ``warmup_epochs`` is 0."""
        return warmup_factor(self.current_epoch, warmup_epochs)

    def distillation_logits(self, student_out: ModelOutput, teacher_out: ModelOutput) -> tuple[Tensor, Tensor]:
        """Student and teacher logits as a loss should see them (standardized when ``standardize``)."""
        student_logits, teacher_logits = student_out.logits, teacher_out.logits
        if self.hparams.get("standardize"):
            return standardize_logits(student_logits), standardize_logits(teacher_logits)
        return student_logits, teacher_logits

    def cross_entropy(self, student_logits: Tensor, target: Tensor) -> Tensor:
        """The supervised loss with the labels, in float32, averaged over the labelled positions: logits ``[B, C]``,
        ``[B, C, H, W]`` (per pixel) or ``[B, T, V]`` (per token), positions labelled ``-100`` left out; on a mixed
        batch, with the mixed labels (cross-entropy is linear in the label)."""
        if student_logits.dim() == 3:  # tokens: classes last
            student_logits = student_logits.transpose(1, 2)
        if self.mixing is None:
            return F.cross_entropy(student_logits.float(), target, ignore_index=IGNORE_INDEX)
        return F.cross_entropy(student_logits.float(), self.mixing.mix_targets(target, self.num_classes))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student plus the method's own trainable parts: what the optimizer sees (never the teacher)."""
        return [p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad]

    # -------------------------------------------------------------------------------------------------- steps
    @staticmethod
    def unpack_batch(batch: Any) -> Batch:
        if isinstance(batch, Batch):
            return batch
        if isinstance(batch, dict):
            return Batch(batch["input"], batch["target"], batch.get("index"), dict(batch.get("views") or {}),
                         batch.get("mask"))
        return Batch(*batch[:3])

    def _check_targets(self, target: Tensor, batch_idx: int) -> None:
        if target.device.type != "cpu" and batch_idx > 0:
            return
        if target.is_floating_point():
            raise ValueError(f"labels must be class indices (torch.long), but batch {batch_idx} holds {target.dtype} "
                             "labels: convert them in the data module, e.g. torch.as_tensor(labels, dtype=torch.long)")
        if target.dim() > 1:  # per-pixel / per-token labels: positions labelled IGNORE_INDEX are left out
            target = target[target != IGNORE_INDEX]
            if target.numel() == 0:
                return
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}] for num_classes={self.num_classes}, "
                             f"but batch {batch_idx} holds labels from {low} to {high}: check the data module's "
                             "targets or set num_classes to the data's number of classes")

    def _first_forward(self, role: str, forward: Callable[[Batch], ModelOutput], batch: Batch) -> ModelOutput:
        """``forward(batch)``; on the first batch, a model that cannot run on the data's inputs (another resolution or
        channel count than it was built for) gets one error naming the model, the input shape and the fix."""
        if self._outputs_checked:
            return forward(batch)
        try:
            return forward(batch)
        except RuntimeError as error:
            model = getattr(self, role)
            raise ValueError(
                f"the {role} ({type(model).__name__}) cannot run on inputs of shape {tuple(batch.input.shape)}: "
                f"{error}. "
                f"Give the data the input size and channels the {role} was built for, or build the {role} for the "
                "data's (in_chans, and the input size of models with a fixed one); a teacher trained at another "
                "resolution can get its inputs resized with MultiTeacherKD(teacher_inputs=[{'size': ...}])") from error

    def _check_outputs(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if self._outputs_checked:
            return
        for role, logits in (("student", student_logits), ("teacher", teacher_logits)):
            if logits is not None and logits.shape[class_dim(logits)] != self.num_classes:
                raise ValueError(f"the {role} has {logits.shape[class_dim(logits)]} classes but num_classes is "
                                 f"{self.num_classes}: "
                                 f"give the {role} {self.num_classes} outputs or set num_classes to match")
        self._outputs_checked = True

    def setup(self, stage: str) -> None:
        self._setup_fast_paths()
        data_classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"the data module has {data_classes} classes but the model was built with "
                             f"num_classes={self.num_classes}: use num_classes={data_classes} (the CLI links it)")
        if self._pending_terms():
            if self.hparams.get("input_shape") is None:
                self.hparams.input_shape = tuple(infer_input_shape(self.trainer, stage))
            self._build_terms(self.hparams.input_shape, self._pending_terms())
        for term in self.terms.values():
            term.setup(stage)

    def _setup_fast_paths(self) -> None:
        hp = self.hparams
        models = {"student": self.student, "teacher": self.teacher}
        if hp.get("channels_last"):
            for model in models.values():
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        if hp.get("compile") and not self._compiled:
            if self.student_layers or self.teacher_layers:
                raise ValueError(f"compile=True compiles whole models, but {type(self).__name__} hooks layers "
                                 f"({', '.join([*self.student_layers, *self.teacher_layers])}): leave compile off "
                                 "for feature methods")
            # plain dict entries: the compiled wrappers share the modules' parameters but stay out of state_dict
            self._compiled = {name: torch.compile(model) for name, model in models.items()
                              if model is not None and not isinstance(model, nn.ModuleList)}
            if isinstance(self.teacher, nn.ModuleList):  # several teachers (MultiTeacherKD), each compiled on its own
                self._compiled["teachers"] = [torch.compile(model) for model in self.teacher]

    def _forward_pair(self, batch: Batch, batch_idx: int) -> tuple[ModelOutput, ModelOutput | None]:
        self._check_targets(batch.target, batch_idx)
        batch.input = self._input(batch.input)  # once for both models
        # the teacher first: its activations are freed before the student's forward keeps its own for backward
        # (lower peak memory; about 10% faster on CPUs, where the allocator then reuses the same blocks)
        teacher_out = None if self.teacher is None else self._first_forward("teacher", self.forward_teacher, batch)
        student_out = self._first_forward("student", self.forward_student, batch)
        self._check_outputs(student_out.logits, None if teacher_out is None else teacher_out.logits)
        return student_out, teacher_out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.unpack_batch(batch)
        if self.hparams.get("mix") is None:
            return self._training_step(batch, batch_idx)
        if self.replay_teacher is not None:
            raise ValueError(f"mix={self.hparams.mix!r} needs the teacher to see every mixed batch, but the teacher's "
                             "outputs are replayed from a cache: drop the teacher-output cache or set mix=None")
        images, self.mixing = mix_images(batch.input, self.hparams.mix, self.hparams.mix_alpha)
        try:
            return self._training_step(dataclasses.replace(batch, input=images), batch_idx)
        finally:
            self.mixing = None

    def _training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        student_out, teacher_out = self._forward_pair(batch, batch_idx)
        ce = self.cross_entropy(student_out.logits, batch.target)
        losses = {"ce": self.hparams.ce_weight * ce, **self.distillation_losses(batch, student_out, teacher_out)}
        return self.total_loss(losses, batch_idx)

    def on_train_start(self) -> None:
        for term in self.terms.values():
            term.on_train_start()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for term in self.terms.values():
            term.on_train_batch_end()

    def total_loss(self, losses: dict[str, Tensor], batch_idx: int, log_as: str | None = "train/loss",
                   name_prefix: str = "") -> Tensor:
        """The sum of the weighted ``losses`` in float32: checked for non-finite values when ``check_finite`` (an
        error names ``name_prefix + name``), and logged as ``log_as`` and ``<log_as>_<name>`` on the steps
        :meth:`logs_this_step` picks (``log_as=None``: not logged)."""
        values = torch.stack([value.float() for value in losses.values()])
        if self.hparams.check_finite:
            self._track_finite(values.detach(), [name_prefix + name for name in losses], batch_idx)
        loss = values.sum()
        if log_as is not None and self.logs_this_step(batch_idx):
            self.log(log_as, loss, prog_bar=True)
            for name, value in losses.items():
                self.log(f"{log_as}_{name}", value)
        return loss

    def logs_this_step(self, batch_idx: int) -> bool:
        """Whether the training losses are logged at this step: on the steps the loggers write (every
        ``log_every_n_steps``), at the last batch of each epoch and at the last step of training, so that loggers,
        ``callback_metrics`` and epoch-end callbacks see what they would with logging at every step. Each
        ``self.log`` costs 0.1–0.3 ms of host time, more than a small model's whole step on a fast GPU."""
        trainer = self._trainer
        if trainer is None:
            return True
        step = self.global_step + 1
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        return (step % max(trainer.log_every_n_steps, 1) == 0 or batch_idx + 1 >= trainer.num_training_batches
                or last_step or bool(trainer.fast_dev_run))

    def _track_finite(self, losses: Tensor, names: list[str], batch_idx: int) -> None:
        """Raise on a non-finite loss: at once on the CPU; on accelerators through a device-side record of the
        first bad step, read every ``log_every_n_steps`` steps and before validation (no per-step host sync)."""
        bad = ~torch.isfinite(losses)
        if not self._defer_finite_check(losses.device):
            if bad.any():
                self._raise_nonfinite(self.global_step, batch_idx, [n for n, b in zip(names, bad.tolist()) if b])
            return
        step = torch.full((1,), float(self.global_step), device=losses.device)
        key = tuple(names)
        record = self._nonfinite.get(key)
        if record is None:
            record = torch.full((len(names) + 1,), -1.0, device=losses.device)
        new = bad.any() & (record[0] < 0)
        self._nonfinite[key] = torch.where(new, torch.cat([step, bad.float()]), record)
        interval = getattr(self.trainer, "log_every_n_steps", 50) or 50
        if (batch_idx + 1) % interval == 0:
            self._check_nonfinite()

    @staticmethod
    def _defer_finite_check(device: torch.device) -> bool:
        return device.type != "cpu"

    def _check_nonfinite(self) -> None:
        bad_records = [(record[0], [n for n, b in zip(names, record[1:]) if b])
                       for names, record in ((k, v.tolist()) for k, v in self._nonfinite.items()) if record[0] >= 0]
        if bad_records:
            step, bad = min(bad_records)
            self._raise_nonfinite(int(step), None, bad)

    def _raise_nonfinite(self, step: int, batch_idx: int | None, bad: list[str]) -> None:
        where = f"global step {step}" + (f" (epoch {self.current_epoch}, batch {batch_idx})" if batch_idx is not None
                                         else "")
        raise FloatingPointError(
            f"the loss went non-finite at {where}; non-finite losses: {', '.join(bad)}. Lower the learning rate or "
            "the loss weights, check the inputs for NaN/Inf, or train in full precision")

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._check_nonfinite()

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite()

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        batch = self.unpack_batch(batch)
        student_out, teacher_out = self._forward_pair(batch, batch_idx)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        student_logits, target = student_out.logits, batch.target
        metrics["acc"].update(student_logits, target)
        metrics["ece"].update(student_logits.float().softmax(-1), target)
        if "acc_top5" in metrics:
            metrics["acc_top5"].update(student_logits, target)
        if teacher_out is not None:
            metrics["teacher_acc"].update(teacher_out.logits, target)
            metrics["teacher_ece"].update(teacher_out.logits.float().softmax(-1), target)
            metrics["agreement"].update(student_logits, teacher_out.logits)
            metrics["kl"].update(student_logits, teacher_out.logits)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(self.unpack_batch(batch).input)

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/acc"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self._pending_terms() and self.hparams.get("input_shape") is not None:
            self._build_terms(self.hparams.input_shape, self._pending_terms())
        for term in self.terms.values():
            term.on_load_checkpoint(checkpoint)
        self._rename_legacy_keys(state)
        if self.teacher is not None and not any(k.startswith("teacher.") for k in state):
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = True, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, always with ``torch.load(weights_only=True)``: a checkpoint is read as
        tensors, numbers, strings and containers, never as pickled objects that could run code (terms are stored as
        specs, optimizer factories not at all). ``weights_only=False`` is refused."""
        if weights_only is False:
            raise ValueError("load_from_checkpoint(weights_only=False) would unpickle arbitrary objects, which can "
                             "run code from the file; lightning-kd checkpoints load with weights_only=True. For a "
                             "file that needs more, load it once in a trusted session and re-save its state_dict")
        try:
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=True, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path):
                load_checkpoint(checkpoint_path)  # an unsafe or damaged file: its own error, naming the fix
            raise

    def _rename_legacy_keys(self, state: dict[str, Tensor]) -> None:
        """Checkpoints written before a method's parts moved into its terms hold them at the top level
        (``projector.weight``); rename each such key to the one term entry it now is
        (``terms.fitnet.projector.weight``)."""
        own = set(self.state_dict())
        for key in [k for k in state if k not in own]:
            moved = [f"terms.{name}.{key}" for name in self.terms if f"terms.{name}.{key}" in own]
            if len(moved) == 1 and moved[0] not in state:
                state[moved[0]] = state.pop(key)

    def export_student(self, path: str | os.PathLike) -> None:
        """Save the student's ``state_dict`` alone, for deployment or as a later run's ``teacher_weights``."""
        torch.save(self.student.state_dict(), path)


class LogitDistillationModule(DistillationModule):
    """The base of methods that distil from logits alone: :class:`DistillationModule` (which now holds ``standardize``,
    ``mix`` and the warm-up ramp for every method), kept under this name for subclasses written against it."""
