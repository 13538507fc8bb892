"""Terms that distil from logits."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import dkd_loss, kd_loss
from lightning_kd.terms.base import DistillationTerm


class KDTerm(DistillationTerm):
    """Hinton et al., "Distilling the Knowledge in a Neural Network", 2015: ``{"kd": T² · KL(softmax(t/T) ‖
    softmax(s/T))}``, the KL summed over classes and averaged over the batch
    (:func:`~lightning_kd.losses.kd_loss`).

    Args:
        temperature: softening temperature T of both distributions.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, temperature: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"kd": kd_loss(student_logits, teacher_logits, self.temperature)}


class DKDTerm(DistillationTerm):
    """Decoupled KD (Zhao et al., CVPR 2022): ``{"dkd": α · TCKD + β · NCKD}``, each KL summed and averaged over the
    batch, × T² (:func:`~lightning_kd.losses.dkd_loss`); reads the labels. The paper ramps the term in over 20
    epochs (``warmup_epochs``).

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softening temperature T.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.logits(student_out, teacher_out)
        return {"dkd": dkd_loss(student_logits, teacher_logits, batch.target, self.alpha, self.beta,
                                self.temperature)}
