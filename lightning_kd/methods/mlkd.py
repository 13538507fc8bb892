from __future__ import annotations

from torch import Tensor

from lightning_kd.losses.logit_extra import mlkd_loss
from lightning_kd.methods.base import Batch, LogitDistillationModule, ModelOutput


class MLKD(LogitDistillationModule):
    """Multi-level logit distillation (Jin et al., "Multi-Level Logit Distillation", CVPR 2023), on one view.

    ``loss = ce_weight · CE + kd_weight · Σ_T [f_B · (T² · KL + batch-correlation term) + f_C · class-correlation
    term]``: instance-level KD and the alignment of the teacher's and student's sample-by-sample (B × B) and
    class-by-class (C × C) prediction correlations, summed over the temperatures 2–6, with the official confidence
    masks, which scale the instance and batch terms by the kept fraction of samples ``f_B`` and the class term by
    the kept fraction of classes ``f_C`` (about 1/2 each; see :func:`lightning_kd.losses.logit_extra.mlkd_loss`
    for the reductions).

    Views: the official method trains on a weak and a strong (RandAugment) view of each batch, with CE on both and
    an extra unmasked instance KD on the strong view. This class trains on the batch the data module gives, as one
    view: the loss is the official weak-view loss, which is also the single-view variant that the RLD authors use
    as their MLKD baseline without augmentation (``MLKD_NOAUG`` in ``zju-SWJ/RLD``). Defaults temperatures
    (2, 3, 4, 5, 6), kd_weight 0.9 for all three levels and CE 0.1 are the official CIFAR-100 setting (the KD
    configuration of ``Jin-Ying/Multi-Level-Logit-Distillation``).

    Args:
        temperatures: the temperatures the losses are summed over.
        kd_weight: weight of the multi-level term (each level alike, as in the official code).
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0), kd_weight: float = 0.9,
                 ce_weight: float = 0.1, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        student_logits, teacher_logits = self.distillation_logits(student_out, teacher_out)
        return {"mlkd": self.hparams.kd_weight * mlkd_loss(student_logits, teacher_logits,
                                                           self.hparams.temperatures)}
