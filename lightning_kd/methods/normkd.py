from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import NormKDTerm


class NormKD(DistillationModule):
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
        self.add_term("normkd", NormKDTerm(temperature_scale, weight=kd_weight))
