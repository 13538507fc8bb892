from __future__ import annotations

from torch import nn

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import CTKDTerm


class CTKD(DistillationModule):
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
        self.add_term("ctkd", CTKDTerm(min_temperature, max_temperature, min_lambda, max_lambda, lambda_epochs,
                                       weight=kd_weight))

    @property
    def temperature(self) -> nn.Parameter:
        """The learnt raw temperature θ (a trainable scalar; the temperature is ``T_min + (T_max − T_min) ·
        sigmoid(θ)``)."""
        return self.terms["ctkd"].temperature
