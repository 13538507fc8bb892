from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import DISTTerm


class DIST(DistillationModule):
    """DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

    ``loss = ce_weight · CE + T² · (β · (1 − mean_i ρ(p_s[i], p_t[i])) + γ · (1 − mean_c ρ(p_s[:, c], p_t[:, c])))``
    with ρ the Pearson correlation and p = softmax(z / T): inter-class relation per sample, intra-class
    relation per class over the batch. Defaults β=2, γ=2, T=4, CE 1 are the official CIFAR-100 setting
    (its config weighs the β=γ=1 loss by 2).

    Args:
        beta: weight of the inter-class (per-sample) relation term.
        gamma: weight of the intra-class (per-class) relation term.
        temperature: softening temperature τ.
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("dist", DISTTerm(beta, gamma, temperature))
