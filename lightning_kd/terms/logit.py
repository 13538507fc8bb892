"""Terms that distil from logits.

Dense outputs: a term on per-pixel ``(B, C, H, W)`` or per-token ``(B, T, V)`` logits hands the loss the batch's
labels (``batch.target``, of the positions' shape) and, when the batch carries one, its boolean ``mask``; the loss
then averages over the positions whose label is not the term's ``ignore_index`` (see
:mod:`lightning_kd.losses.logit`). ``(B, C)`` logits are passed as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.losses import dist_loss, dkd_loss, kd_loss, mlkd_loss, normkd_loss, rld_loss, virtual_teacher_loss
from lightning_kd.nn.temperature import cosine_lambda, ctkd_temperature
from lightning_kd.terms.base import DistillationTerm


def _positions(batch, logits: Tensor, ignore_index: int, target: bool = True) -> dict[str, Any]:
    """The keyword arguments that select the positions of dense logits (more than 2 dims): the labels (unless the
    loss takes them anyway, ``target=False``), the batch's ``mask`` when it has one, and ``ignore_index``; none for
    ``(B, C)`` logits."""
    if logits.dim() <= 2:
        return {}
    kwargs: dict[str, Any] = {"mask": getattr(batch, "mask", None), "ignore_index": ignore_index}
    if target:
        kwargs["target"] = batch.target
    return kwargs


class KDTerm(DistillationTerm):
    """Hinton et al., "Distilling the Knowledge in a Neural Network", 2015: ``{"kd": T² · KL(softmax(t/T) ‖
    softmax(s/T))}``, the KL summed over classes and averaged over the batch, or over the valid pixels / tokens
    of dense logits (:func:`~lightning_kd.losses.kd_loss`).

    Args:
        temperature: softening temperature T of both distributions.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, temperature: float = 4.0, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.temperature, self.ignore_index = temperature, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"kd": kd_loss(student_logits, teacher_logits, self.temperature,
                              **_positions(batch, student_logits, self.ignore_index))}


class DKDTerm(DistillationTerm):
    """Decoupled KD (Zhao et al., CVPR 2022): ``{"dkd": α · TCKD + β · NCKD}``, each KL summed and averaged over the
    batch (or the valid pixels / tokens), × T² (:func:`~lightning_kd.losses.dkd_loss`); reads the labels. The paper
    ramps the term in over 20 epochs (``warmup_epochs``).

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softening temperature T.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ignore_index: int = -100,
                 **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.temperature, self.ignore_index = alpha, beta, temperature, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"dkd": dkd_loss(student_logits, teacher_logits, batch.target, self.alpha, self.beta,
                                self.temperature, **_positions(batch, student_logits, self.ignore_index, False))}


class DISTTerm(DistillationTerm):
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): ``{"dist": T² · (β · (1 −
    mean_i ρ(p_s[i], p_t[i])) + γ · (1 − mean_c ρ(p_s[:, c], p_t[:, c])))}`` with ρ the Pearson correlation and
    p = softmax(z / T): inter-class relation averaged over the samples, intra-class relation over the classes
    (:func:`~lightning_kd.losses.dist_loss`; dense logits: every valid pixel / token is a sample). Defaults β = γ = 2,
    T = 4: the official CIFAR-100 setting (its config weighs the β = γ = 1 loss by 2).

    Args:
        beta: weight of the inter-class (per-sample) relation term.
        gamma: weight of the intra-class (per-class) relation term.
        temperature: softening temperature T.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0, ignore_index: int = -100,
                 **kwargs):
        super().__init__(**kwargs)
        self.beta, self.gamma, self.temperature, self.ignore_index = beta, gamma, temperature, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"dist": dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.temperature,
                                  **_positions(batch, student_logits, self.ignore_index))}


class CTKDTerm(DistillationTerm):
    """Curriculum temperature KD (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023),
    global temperature: ``{"kd": T² · KL(softmax(t/T) ‖ softmax(s/T))}`` (batch mean, :func:`~lightning_kd.losses.
    kd_loss`) with ``T = T_min + (T_max − T_min) · sigmoid(θ)`` learnt through a gradient-reversal layer, so that θ
    ascends the loss the student descends (:func:`~lightning_kd.nn.ctkd_temperature`). The reversal strength λ
    follows a cosine curriculum from ``min_lambda`` to ``max_lambda`` over ``lambda_epochs``
    (:func:`~lightning_kd.nn.cosine_lambda`, epochs counted from 1); θ (``temperature``, a trainable scalar
    optimized with the student) starts at 1, as in the official code. While training, the current temperature is
    logged as ``train/temperature``.

    Args:
        min_temperature: lower end of the learnt temperature's range.
        max_temperature: upper end of the learnt temperature's range.
        min_lambda: gradient-reversal strength at the start of the curriculum.
        max_lambda: gradient-reversal strength at its end.
        lambda_epochs: length of the cosine curriculum in epochs.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, min_temperature: float = 1.0, max_temperature: float = 21.0, min_lambda: float = 0.0,
                 max_lambda: float = 1.0, lambda_epochs: int = 10, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        if not max_temperature > min_temperature:
            raise ValueError(f"max_temperature={max_temperature} must exceed min_temperature={min_temperature}: the "
                             "learnt temperature lies between them")
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        self.min_lambda, self.max_lambda, self.lambda_epochs = min_lambda, max_lambda, lambda_epochs
        self.ignore_index = ignore_index
        self.temperature = nn.Parameter(torch.ones(()))

    def current_temperature(self) -> Tensor:
        """The temperature of this epoch's curriculum step (gradient reversal included), a 0-d tensor."""
        lambda_ = cosine_lambda(self.epoch + 1, self.max_lambda, self.min_lambda, self.lambda_epochs)
        return ctkd_temperature(self.temperature, lambda_, self.min_temperature, self.max_temperature)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        temperature = self.current_temperature()
        host = self.host
        if host._trainer is not None:  # logging needs a trainer; a term used on its own logs nothing
            host.log("train/temperature", temperature.detach())
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"kd": kd_loss(student_logits, teacher_logits, temperature,
                              **_positions(batch, student_logits, self.ignore_index))}


class NormKDTerm(DistillationTerm):
    """NormKD (Chi et al., "NormKD: Normalized Logits for Knowledge Distillation", 2023): ``{"kd": Tt_i² ·
    KL(softmax(t_i / Tt_i) ‖ softmax(s_i / Ts_i))}`` with per-sample temperatures ``T_i = k · std(z_i)`` of each
    network's own logits, averaged over the batch or the valid pixels / tokens
    (:func:`~lightning_kd.losses.normkd_loss`).

    Args:
        temperature_scale: the factor k of ``T_i = k · std(z_i)`` (2 on CIFAR-100, 1 on ImageNet).
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, temperature_scale: float = 2.0, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.temperature_scale, self.ignore_index = temperature_scale, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"kd": normkd_loss(student_logits, teacher_logits, self.temperature_scale,
                                  **_positions(batch, student_logits, self.ignore_index))}


class RLDTerm(DistillationTerm):
    """Refined logit distillation (Sun et al., "Knowledge Distillation with Refined Logits", arXiv:2408.07703, 2024):
    ``{"rld": α · SCD + β · MCD}``: sample confidence distillation (the student's label-vs-rest distribution against
    the teacher's top-1 confidence) and masked correlation distillation (the classes the teacher ranks below the
    label), each KL summed over classes, averaged over the batch (or the valid pixels / tokens) and × T²
    (:func:`~lightning_kd.losses.rld_loss`); reads the labels. The official code ramps the term in over 20 epochs
    (``warmup_epochs``).

    Args:
        alpha: weight of sample confidence distillation (SCD).
        beta: weight of masked correlation distillation (MCD).
        temperature: temperature of MCD, and of SCD unless ``confidence_temperature`` is given.
        confidence_temperature: a separate temperature for SCD; ``None``: ``temperature``.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 confidence_temperature: float | None = None, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.confidence_temperature, self.ignore_index = confidence_temperature, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"rld": rld_loss(student_logits, teacher_logits, batch.target, self.alpha, self.beta, self.temperature,
                                self.confidence_temperature,
                                **_positions(batch, student_logits, self.ignore_index, False))}


class MLKDTerm(DistillationTerm):
    """Multi-level logit distillation (Jin et al., "Multi-Level Logit Distillation", CVPR 2023).

    One view: ``{"mlkd": Σ_T [f_B · (T² · KL + batch-correlation term) + f_C · class-correlation term]}`` over the
    ``temperatures``, with the official confidence masks (:func:`~lightning_kd.losses.mlkd_loss`; ``(B, C)`` logits
    only). When ``batch.views`` holds a ``"strong"`` view of the same samples, teacher and student also run on it
    (through the host's ``forward_teacher``/``forward_student``) and two losses join: ``"mlkd_strong" = Σ_T T² ·
    KL``, the unmasked instance KD, read on the strong view for the ``strong_temperatures`` and on the given view for
    the others, and ``"ce_strong"``, the host's cross-entropy on the strong view. ``"mlkd"`` and ``"mlkd_strong"``
    are × ``weight`` (× ramp); ``"ce_strong"`` is × the host's ``ce_weight``, like the cross-entropy on the given
    view. KL is summed over classes and averaged over the batch.

    Args:
        temperatures: the temperatures the losses are summed over.
        strong_temperatures: with a strong view, the temperatures (among ``temperatures``) whose instance KD reads
            the strong view.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 strong_temperatures: Sequence[float] = (3.0, 4.0, 5.0), **kwargs):
        super().__init__(**kwargs)
        unknown = {float(t) for t in strong_temperatures} - {float(t) for t in temperatures}
        if unknown:
            raise ValueError(f"strong_temperatures {sorted(unknown)} are not among temperatures "
                             f"{tuple(temperatures)}: choose strong_temperatures from temperatures")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.strong_temperatures = tuple(float(t) for t in strong_temperatures)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        losses = {"mlkd": mlkd_loss(student_logits, teacher_logits, self.temperatures)}
        strong = batch.views.get("strong")
        if strong is None:
            return losses
        host = self.host
        if host.mixing is not None or host.replay_teacher is not None:
            raise ValueError("MLKD's strong view needs the teacher to see it and is not mixed: with a strong view, set "
                             "mix=None and drop the teacher-output cache")
        strong_batch = type(batch)(strong, batch.target, batch.index)
        teacher_strong = host.forward_teacher(strong_batch)
        student_strong = host.forward_student(strong_batch)
        student_strong_logits, teacher_strong_logits = self.logits(student_strong, teacher_strong)
        losses["mlkd_strong"] = sum(
            kd_loss(student_strong_logits, teacher_strong_logits, t) if t in self.strong_temperatures
            else kd_loss(student_logits, teacher_logits, t) for t in self.temperatures)
        losses["ce_strong"] = host.cross_entropy(student_strong.logits, batch.target)
        return losses

    def forward(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        """:meth:`losses`, the distillation losses × ``weight`` × the warm-up ramp, ``"ce_strong"`` × the host's
        ``ce_weight``."""
        factor = self.weight * self.ramp()
        return {name: (self.host.hparams.ce_weight if name == "ce_strong" else factor) * value
                for name, value in self.losses(batch, student_out, teacher_out).items()}


class TfKDVirtualTerm(DistillationTerm):
    """Teacher-free KD with a hand-designed teacher, Tf-KD_reg (Yuan et al., "Revisiting Knowledge Distillation via
    Label Smoothing Regularization", CVPR 2020): ``{"virtual": KL(softmax(p_d / T) ‖ softmax(s))}`` with ``p_d`` the
    teacher that puts ``correct_prob`` on the label and the rest evenly on the other classes, softened as in the
    official code, the student at temperature 1; the KL summed over classes and averaged over the batch (or the
    valid pixels / tokens) (:func:`~lightning_kd.losses.virtual_teacher_loss`). Reads the labels and no teacher
    model; the official reduction (the mean over all B × C entries) is the weight divided by the number of classes.
    Reads the student's logits as they are (no standardization).

    Args:
        correct_prob: probability ``a`` of the labelled class in the hand-designed teacher.
        temperature: softening temperature T of the hand-designed teacher.
        ignore_index: label of the pixels / tokens that dense logits leave out.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    requires_teacher = False

    def __init__(self, correct_prob: float = 0.99, temperature: float = 20.0, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.correct_prob, self.temperature, self.ignore_index = correct_prob, temperature, ignore_index

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits = student_out.logits
        return {"virtual": virtual_teacher_loss(student_logits, batch.target, self.correct_prob, self.temperature,
                                                **_positions(batch, student_logits, self.ignore_index, False))}
