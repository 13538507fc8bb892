from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import DKDTerm


class DKD(DistillationModule):
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
        self.add_term("dkd", DKDTerm(alpha, beta, temperature, warmup_epochs=warmup_epochs))
