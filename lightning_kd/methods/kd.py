from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import kd_loss
from lightning_kd.methods.base import Batch, LogitDistillationModule, ModelOutput


class KD(LogitDistillationModule):
    """Knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

    ``loss = ce_weight · CE(s, y) + kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))``, the KL summed over
    classes and averaged over the batch. Defaults T=4, CE 0.1, KD 0.9 are the CIFAR-100 setting of CRD
    (Tian et al., ICLR 2020) and its RepDistiller code, tuned with this reduction.

    Args:
        temperature: softening temperature T of both distributions.
        kd_weight: weight of the distillation term.
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, temperature: float = 4.0, kd_weight: float = 0.9, ce_weight: float = 0.1, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.distillation_logits(student_out, teacher_out)
        return {"kd": self.hparams.kd_weight * kd_loss(student_logits, teacher_logits, self.hparams.temperature)}
