from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kd.losses import cosine_lambda, ctkd_temperature, kd_loss
from lightning_kd.methods.base import Batch, LogitDistillationModule, ModelOutput


class CTKD(LogitDistillationModule):
    """Curriculum temperature for knowledge distillation (Li et al., AAAI 2023), global-temperature form.

    KD whose temperature is learnt adversarially: ``T = T_min + (T_max − T_min) · sigmoid(θ)`` with θ trained by
    the student's optimizer through a gradient-reversal layer, so θ *maximises* the KD loss the student
    minimises; the reversal strength λ follows a cosine curriculum from ``min_lambda`` to ``max_lambda`` over
    ``lambda_epochs`` (epochs counted from 1, θ starts at 1, as in the official code). ``loss = ce_weight · CE + kd_weight · T² · KL(teacher ‖ student)`` (batch mean).
    Defaults (CE 0.1, KD 0.9, T ∈ [1, 21], λ 0 → 1 over 10 epochs) follow the paper's CIFAR-100 setting with
    vanilla KD. The current temperature is logged as ``train/temperature``.

    Args:
        kd_weight: weight of the distillation term.
        ce_weight: weight of the cross-entropy with the labels.
        min_temperature: lower end of the learnt temperature's range.
        max_temperature: upper end of the learnt temperature's range.
        min_lambda: gradient-reversal strength at the start of the curriculum.
        max_lambda: gradient-reversal strength at its end.
        lambda_epochs: length of the cosine curriculum in epochs.
    """

    def __init__(self, *args, kd_weight: float = 0.9, ce_weight: float = 0.1, min_temperature: float = 1.0,
                 max_temperature: float = 21.0, min_lambda: float = 0.0, max_lambda: float = 1.0,
                 lambda_epochs: int = 10, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.temperature = nn.Parameter(torch.ones(()))

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        lambda_ = cosine_lambda(self.current_epoch + 1, hp.max_lambda, hp.min_lambda, hp.lambda_epochs)
        temperature = ctkd_temperature(self.temperature, lambda_, hp.min_temperature, hp.max_temperature)
        self.log("train/temperature", temperature.detach())
        student_logits, teacher_logits = self.distillation_logits(student_out, teacher_out)
        return {"kd": hp.kd_weight * kd_loss(student_logits, teacher_logits, temperature)}
