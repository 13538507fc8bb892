from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import KDTerm


class KD(DistillationModule):
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
        self.add_term("kd", KDTerm(temperature, weight=kd_weight))
