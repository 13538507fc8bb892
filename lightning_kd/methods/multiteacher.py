"""Knowledge distillation from several frozen teachers, combined per sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses import standardize_logits
from lightning_kd.methods.base import Batch, DistillationModule, LogitDistillationModule, ModelOutput, load_weights
from lightning_kd.terms import KDTerm

COMBINE_RULES = ("mean", "fixed", "confidence")
INPUT_KEYS = ("size", "mean", "std", "interpolation")
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def confidence_weights(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample teacher weights of CA-MKD (Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge
    Distillation", ICASSP 2022, Eq. 2 and the official ``CAMKD`` branch of ``Rorozhl/CA-MKD``).

    ``w_ki = (1 − softmax_k(CE_ki)) / (K − 1)`` with ``CE_ki`` the cross-entropy (temperature 1) of teacher ``k``
    with the label of sample ``i``: the teachers closer to the label weigh more; the weights of a sample sum to 1.
    With one teacher the weight is 1.

    Args:
        teacher_logits: ``(K, B, C)`` logits of the K teachers.
        target: ``(B,)`` integer labels, or ``(B, C)`` label distributions (e.g. mixed labels).

    Returns:
        ``(K, B)`` float32 weights.
    """
    num_teachers = teacher_logits.shape[0]
    log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
    if target.dim() == 1:
        ce = -log_probs.gather(-1, target.view(1, -1, 1).expand(num_teachers, -1, 1)).squeeze(-1)
    else:
        ce = -(target.float().unsqueeze(0) * log_probs).sum(-1)
    if num_teachers == 1:
        return torch.ones_like(ce)
    return (1.0 - ce.softmax(dim=0)) / (num_teachers - 1)


def combine_teachers(teacher_logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of the weighted mixture of the teachers' softened distributions,
    ``log Σ_k w_ki · softmax(z_ki / T)``, computed as a ``logsumexp`` (finite wherever one weight is positive).

    Args:
        teacher_logits: ``(K, B, C)`` logits of the K teachers.
        weights: ``(K, B)`` per-sample or ``(K,)`` per-teacher weights, each sample's summing to 1.
        temperature: softening temperature T.

    Returns:
        ``(B, C)`` float32 log-probabilities.
    """
    log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    weights = weights.float().to(log_probs.device)
    log_weights = weights.log().view(*weights.shape, *(1,) * (log_probs.dim() - weights.dim()))
    return torch.logsumexp(log_weights + log_probs, dim=0)


@dataclass(frozen=True)
class TeacherInput:
    """How one teacher wants its input: resized to ``size`` (``(H, W)``) with ``F.interpolate`` in mode
    ``interpolation``, and/or re-normalised from the data's mean and std to its own ``mean`` and ``std``."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    @classmethod
    def parse(cls, spec: dict[str, Any] | None, index: int) -> TeacherInput:
        where = f"teacher_inputs[{index}]"
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a mapping with keys among {', '.join(INPUT_KEYS)} or null, got {spec!r}")
        unknown = sorted(set(spec) - set(INPUT_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {', '.join(unknown)}: use {', '.join(INPUT_KEYS)}")
        if ("mean" in spec) != ("std" in spec):
            raise ValueError(f"{where} gives only one of mean and std: give both (the teacher's normalisation)")
        size = spec.get("size")
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"{where}: size must be a positive int or [height, width], got {spec['size']!r}")
        mean, std = (None if spec.get(key) is None else _floats(spec[key]) for key in ("mean", "std"))
        if std is not None and min(std) <= 0:
            raise ValueError(f"{where}: std must be positive, got {list(std)}")
        interpolation = spec.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{where}: unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        return cls(size, mean, std, interpolation)


def _floats(value: float | Sequence[float]) -> tuple[float, ...]:
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def _classes_of(model: nn.Module) -> int | None:
    """The number of outputs of a model's classifier, where the model says it (zoo and timm models)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    classes = getattr(model, "num_classes", None)
    return classes if isinstance(classes, int) else None


@dataclass
class MultiTeacherOutput(ModelOutput):
    """The combined teacher: ``logits`` are the log-probabilities of the weighted mixture at temperature 1;
    ``teacher_logits`` ``(K, B, C)`` each teacher's logits and ``teacher_weights`` ``(K, B)`` their weights."""

    teacher_logits: Tensor | None = None
    teacher_weights: Tensor | None = None


class MultiTeacherKD(LogitDistillationModule):
    """Knowledge distillation from several teachers, combined per sample (multi-teacher KD: You et al., "Learning
    from Multiple Teacher Networks", KDD 2017; confidence weights: Zhang, Chen & Wang, "Confidence-Aware
    Multi-Teacher Knowledge Distillation", ICASSP 2022).

    ``loss = ce_weight · CE + kd_weight · T² · KL(p̄ ‖ softmax(s/T))`` with ``p̄_i = Σ_k w_ki · softmax(z_ki / T)``,
    the KL summed over classes and averaged over the batch (:func:`lightning_kd.losses.kd_loss` on the mixture).
    Its gradient equals that of ``Σ_k w_ki · KL(softmax(z_ki/T) ‖ softmax(s/T))``, the per-teacher weighted KL of
    the papers (the two differ by a constant). Weights ``w_ki`` (``combine``): ``"mean"`` 1/K; ``"fixed"`` the
    normalised ``combine_weights``; ``"confidence"`` CA-MKD's :func:`confidence_weights` from each teacher's
    cross-entropy with the label (the mixed label when ``mix`` is set). Defaults T=4, CE 1, KD 1 are the CA-MKD
    code's CIFAR-100 setting; its CA-MKD branch also divides the weighted KL by K, i.e. ``kd_weight = 1/K`` here.

    The teachers may differ in architecture, input size and normalisation: ``teacher_inputs`` gives each one's
    input as a mapping (YAML-friendly; ``null`` keeps the batch as it is)::

        teacher_inputs: [null, {size: 64, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}]
        data_mean: [0.5071, 0.4867, 0.4408]     # what the data module normalised with
        data_std: [0.2675, 0.2565, 0.2761]

    ``size`` (int or ``[H, W]``) resizes with ``F.interpolate`` (``interpolation``, default ``"bilinear"``);
    ``mean``/``std`` turn the data's normalisation into the teacher's: ``x · σ_data / σ_t + (μ_data − μ_t) / σ_t``.

    The teachers are kept as ``self.teacher``, an ``nn.ModuleList``: frozen, in eval mode, out of the optimizer
    and of checkpoints like a single teacher. The validation metrics ``teacher_*``, ``agreement`` and ``kl``
    measure the combined teacher at T=1, with the same weights (so, under ``"confidence"``, weights that know the
    label).

    The loss is the term :class:`~lightning_kd.terms.KDTerm` (``terms.kd``) fed with the combined teacher; logit
    terms added with :meth:`add_term` see the same combined teacher.

    Args:
        teacher: the teachers: a list of ``nn.Module`` or model names (a single one is one teacher).
        teacher_weights: one weights file per teacher (``null`` for none), each loaded strictly with
            :func:`lightning_kd.models.weights.load_weights`; a single path for a single teacher.
        combine: ``"mean"``, ``"fixed"`` or ``"confidence"``.
        combine_weights: one non-negative weight per teacher for ``combine="fixed"`` (normalised to sum 1).
        teacher_inputs: one input mapping (or ``null``) per teacher, see above.
        data_mean: the per-channel mean (or one number) that the data was normalised with; needed by
            ``teacher_inputs`` that give ``mean``/``std``.
        data_std: likewise, the standard deviation.
        temperature: softening temperature T.
        kd_weight: weight of the distillation term.
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, student: str | nn.Module, teacher: str | nn.Module | list[str | nn.Module] | None = None, *,
                 num_classes: int, in_chans: int = 3, teacher_weights: str | list[str | None] | None = None,
                 combine: str = "mean", combine_weights: list[float] | None = None,
                 teacher_inputs: list[dict[str, Any] | None] | None = None,
                 data_mean: float | list[float] | None = None, data_std: float | list[float] | None = None,
                 temperature: float = 4.0, kd_weight: float = 1.0, ce_weight: float = 1.0, **kwargs):
        teachers = self._teacher_list(teacher)
        count = len(teachers)
        weights_files = self._per_teacher(teacher_weights, count, "teacher_weights", "a weights file (or null)")
        specs = [TeacherInput.parse(spec, i) for i, spec in
                 enumerate(self._per_teacher(teacher_inputs, count, "teacher_inputs", "an input mapping (or null)"))]
        fixed = self._fixed_weights(combine, combine_weights, count)
        scale, shift = self._renormalisation(specs, data_mean, data_std, in_chans)
        # Names stay names (recorded, so that load_from_checkpoint rebuilds them; built by `_build`); modules go in
        # as one ModuleList, which the base leaves out of the hyper-parameters as it does a single teacher module.
        if all(isinstance(t, str) for t in teachers):
            handed: list[str] | nn.ModuleList = teachers
        else:
            handed = nn.ModuleList(DistillationModule._build(t, num_classes, in_chans) for t in teachers)
            for i, model in enumerate(handed):
                classes = _classes_of(model)
                if classes is not None and classes != num_classes:
                    raise ValueError(f"teacher {i} ({type(model).__name__}) has {classes} classes but num_classes "
                                     f"is {num_classes}: give every teacher {num_classes} outputs")
        super().__init__(student=student, teacher=handed, num_classes=num_classes, in_chans=in_chans,
                         ce_weight=ce_weight, **kwargs)
        for i, path in enumerate(weights_files):
            if path is not None:
                load_weights(self.teacher[i], path, role=f"teacher {i}", argument=f"teacher_weights[{i}]")
        self.register_buffer("fixed_weights", fixed, persistent=False)
        # standardize=False: the logits are standardized per teacher, before they are combined
        self.add_term("kd", KDTerm(temperature, weight=kd_weight, standardize=False))
        self.teacher_input_specs = specs
        self.register_buffer("teacher_input_scale", scale, persistent=False)
        self.register_buffer("teacher_input_shift", shift, persistent=False)

    # --------------------------------------------------------------------------------------------- arguments
    @staticmethod
    def _teacher_list(teacher: Any) -> list[str | nn.Module]:
        if isinstance(teacher, (str, nn.Module)) and not isinstance(teacher, nn.ModuleList):
            return [teacher]
        teachers = list(teacher or [])
        if not teachers:
            raise ValueError("MultiTeacherKD needs teachers: pass teacher=[<model name or nn.Module>, ...] "
                             "(and teacher_weights=[<path>, ...] for models built by name)")
        return teachers

    @staticmethod
    def _per_teacher(values: Any, count: int, name: str, what: str) -> list[Any]:
        if values is None:
            return [None] * count
        if isinstance(values, (str, dict)):
            values = [values]
        values = list(values)
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} teachers: give {what} per teacher, "
                             "in the order of teacher")
        return values

    @staticmethod
    def _fixed_weights(combine: str, combine_weights: list[float] | None, count: int) -> Tensor:
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown combine={combine!r}: use one of {', '.join(COMBINE_RULES)}")
        if (combine == "fixed") != (combine_weights is not None):
            raise ValueError("combine_weights go with combine='fixed' (and combine='fixed' needs them): give both "
                             "or neither")
        if combine_weights is None:
            return torch.full((count,), 1.0 / count)
        weights = torch.tensor([float(w) for w in combine_weights], dtype=torch.float64)
        if len(weights) != count or (weights < 0).any() or weights.sum() <= 0 or not torch.isfinite(weights).all():
            raise ValueError(f"combine_weights={list(combine_weights)} must be {count} non-negative numbers (one per "
                             "teacher), not all zero")
        return (weights / weights.sum()).float()

    @staticmethod
    def _renormalisation(specs: list[TeacherInput], data_mean: Any, data_std: Any,
                         in_chans: int) -> tuple[Tensor, Tensor]:
        """``(K, C, 1, 1)`` scale and shift with ``x_teacher = x · scale + shift`` (identity where not asked)."""
        scale, shift = torch.ones(len(specs), in_chans, 1, 1), torch.zeros(len(specs), in_chans, 1, 1)
        asked = [i for i, spec in enumerate(specs) if spec.mean is not None]
        if not asked:
            return scale, shift
        if data_mean is None or data_std is None:
            raise ValueError(f"teacher_inputs[{asked[0]}] re-normalises to its own mean/std, which needs the data's: "
                             "pass data_mean and data_std (what the data module normalised with)")

        def channels(values: tuple[float, ...], name: str) -> Tensor:
            if len(values) not in (1, in_chans):
                raise ValueError(f"{name} has {len(values)} values for {in_chans} input channels: give 1 or "
                                 f"{in_chans}")
            return torch.tensor(values, dtype=torch.float64).expand(in_chans)

        mean_d, std_d = channels(_floats(data_mean), "data_mean"), channels(_floats(data_std), "data_std")
        if (std_d <= 0).any():
            raise ValueError(f"data_std must be positive, got {data_std}")
        for i in asked:
            mean_t, std_t = channels(specs[i].mean, f"teacher_inputs[{i}].mean"), channels(specs[i].std,
                                                                                            f"teacher_inputs[{i}].std")
            scale[i] = (std_d / std_t).float().view(-1, 1, 1)
            shift[i] = ((mean_d - mean_t) / std_t).float().view(-1, 1, 1)
        return scale, shift

    @staticmethod
    def _build(model: Any, num_classes: int, in_chans: int) -> nn.Module:
        if isinstance(model, (list, tuple)):
            return nn.ModuleList(DistillationModule._build(m, num_classes, in_chans) for m in model)
        return DistillationModule._build(model, num_classes, in_chans)

    # ---------------------------------------------------------------------------------------------- teachers
    def teacher_input(self, index: int, images: Tensor) -> Tensor:
        """The batch as teacher ``index`` wants it (resized and re-normalised per ``teacher_inputs``)."""
        spec = self.teacher_input_specs[index]
        if spec.size is not None and tuple(images.shape[-2:]) != spec.size:
            align = False if spec.interpolation in ("bilinear", "bicubic") else None
            images = F.interpolate(images, size=spec.size, mode=spec.interpolation, align_corners=align)
        if spec.mean is not None:
            images = images * self.teacher_input_scale[index].to(images.dtype) + \
                self.teacher_input_shift[index].to(images.dtype)
        return images

    @torch.no_grad()
    def forward_teacher(self, batch: Batch) -> MultiTeacherOutput:
        if self.training and self.replay_teacher is not None:
            raise ValueError("MultiTeacherKD runs its teachers on every batch: teacher outputs replayed from a cache "
                             "hold no per-teacher logits; drop the teacher-output cache")
        if self.teacher.training or any(t.training for t in self.teacher):  # fit restores the modes it found
            self.teacher.eval()
        logits = []
        compiled = self._compiled.get("teachers", list(self.teacher))
        for i, model in enumerate(self.teacher):
            out = compiled[i](self._input(self.teacher_input(i, batch.input)))
            if out.shape[-1] != self.num_classes:
                raise ValueError(f"teacher {i} ({type(model).__name__}) has {out.shape[-1]} classes but num_classes "
                                 f"is {self.num_classes}: give every teacher {self.num_classes} outputs")
            logits.append(out.float())
        teacher_logits = torch.stack(logits)
        weights = self.combination_weights(teacher_logits, batch.target)
        return MultiTeacherOutput(combine_teachers(teacher_logits, weights, 1.0), {}, teacher_logits, weights)

    def combination_weights(self, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """``(K, B)`` weights of the teachers for each sample, per ``combine``."""
        if self.hparams.combine == "confidence":
            labels = target if self.mixing is None else self.mixing.mix_targets(target, self.num_classes)
            return confidence_weights(teacher_logits, labels)
        return self.fixed_weights.view(-1, 1).expand(-1, teacher_logits.shape[1])

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: MultiTeacherOutput) -> dict[str, Tensor]:
        """The terms' losses with the combined teacher as their one teacher: logits ``T · log p̄``, whose softmax at
        T is the mixture ``p̄`` (each teacher's logits standardized first, and the student's, when
        ``standardize``)."""
        hp = self.hparams
        student_logits, teacher_logits = student_out.logits, teacher_out.teacher_logits
        if hp.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        combined = hp.temperature * combine_teachers(teacher_logits, teacher_out.teacher_weights, hp.temperature)
        return super().distillation_losses(batch, ModelOutput(student_logits, student_out.features),
                                           ModelOutput(combined))


__all__ = ["COMBINE_RULES", "MultiTeacherKD", "MultiTeacherOutput", "TeacherInput", "combine_teachers",
           "confidence_weights"]
