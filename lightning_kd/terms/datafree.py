"""The student's term of data-free adversarial distillation."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import kd_loss
from lightning_kd.losses.datafree import logit_l1_discrepancy
from lightning_kd.terms.base import DistillationTerm

DISCREPANCIES = ("l1", "kl")


class DataFreeKDTerm(DistillationTerm):
    """The discrepancy ``D`` between student and teacher on generated inputs (DFAD: Fang et al., "Data-Free
    Adversarial Distillation", 2019), by the name of its kind: ``{"l1": mean_{b,c} |s − t|}``, DFAD's mean absolute
    logit difference over batch and classes (:func:`~lightning_kd.losses.datafree.logit_l1_discrepancy`), or
    ``{"kl": T² · KL(softmax(t/T) ‖ softmax(s/T))}``, summed over classes and averaged over the batch
    (:func:`~lightning_kd.losses.kd_loss`). The student minimizes it; :class:`~lightning_kd.methods.DataFreeKD`'s
    generator maximizes the same :meth:`discrepancy`.

    Args:
        discrepancy: ``"l1"`` (DFAD's) or ``"kl"``.
        temperature: temperature T of the ``"kl"`` discrepancy.
        weight, warmup_epochs, standardize: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    reads_logits = True

    def __init__(self, discrepancy: str = "l1", temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"unknown discrepancy={discrepancy!r}: choose one of {', '.join(DISCREPANCIES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.discrepancy_kind, self.temperature = discrepancy, temperature

    def discrepancy(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``D(student, teacher)`` on logits as given (no standardization)."""
        if self.discrepancy_kind == "l1":
            return logit_l1_discrepancy(student_logits, teacher_logits)
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        return {self.discrepancy_kind: self.discrepancy(*self.logits(student_out, teacher_out))}
