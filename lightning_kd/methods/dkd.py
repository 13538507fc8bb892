from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import dkd_loss
from lightning_kd.methods.base import Batch, LogitDistillationModule, ModelOutput


class DKD(LogitDistillationModule):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    ``loss = ce_weight · CE + ramp · (α · TCKD + β · NCKD)``: target-class KD on the binary (target vs rest)
    distributions and non-target-class KD among the other classes, each KL summed and averaged over the batch,
    × T². ``ramp = min(epoch / warmup_epochs, 1)`` with epochs counted from 1, as in the official code.
    Defaults α=1, β=8, T=4, CE 1, 20 warm-up epochs are the paper's CIFAR-100 setting (β varies per pair,
    see its appendix; set it in the config).

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softening temperature T.
        warmup_epochs: epochs of the linear ramp of the DKD term (0: none).
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: int = 20, ce_weight: float = 1.0, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        ramp = self.warmup_ramp(hp.warmup_epochs)
        student_logits, teacher_logits = self.distillation_logits(student_out, teacher_out)
        return {"dkd": ramp * dkd_loss(student_logits, teacher_logits, batch.target, hp.alpha, hp.beta,
                                       hp.temperature)}
