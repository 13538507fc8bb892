from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import normkd_loss
from lightning_kd.methods.base import Batch, LogitDistillationModule, ModelOutput


class NormKD(LogitDistillationModule):
    """NormKD: normalized logits for knowledge distillation (Chi et al., 2023).

    KD with a per-sample temperature ``T_i = temperature_scale · std(z_i)`` taken from each sample's logits, so
    every sample's output distribution is softened to a similar degree; see
    :func:`lightning_kd.losses.normkd_loss` for the exact reduction (each network divided by its own
    ``T_i``, the per-sample KL × the teacher's ``T_i²``, batch mean). Defaults ``temperature_scale=2``, CE 0.1,
    KD 0.9 are the official CIFAR-100 setting (ImageNet: scale 1, CE 0.5, KD 0.5).

    Args:
        temperature_scale: the factor k of ``T_i = k · std(z_i)``.
        kd_weight: weight of the distillation term.
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, temperature_scale: float = 2.0, kd_weight: float = 0.9, ce_weight: float = 0.1,
                 **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.distillation_logits(student_out, teacher_out)
        loss = normkd_loss(student_logits, teacher_logits, self.hparams.temperature_scale)
        return {"kd": self.hparams.kd_weight * loss}
