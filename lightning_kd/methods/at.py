from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import ATTerm


class AT(DistillationModule):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    ``loss = ce_weight · CE + at_weight · Σ_l mean_{b,j} (Q_s^l − Q_t^l)²`` with ``Q = normalize(mean_c |f_c|^p)``
    the L2-normalised spatial attention map of stage ``l`` (:func:`~lightning_kd.losses.at_loss`: mean over the
    batch and the positions, larger maps pooled to the smaller size), summed over the stage outputs between the
    stem and the global pooling (RepDistiller's ``feat[1:-1]``), paired in order. Defaults: the CRD CIFAR-100
    setting (RepDistiller ``--distill attention -r 1 -a 0 -b 1000``, ``p = 2``).

    Args:
        at_weight: weight of the summed attention losses.
        p: exponent of the attention maps.
        ce_weight: weight of the cross-entropy with the labels.
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
    """

    def __init__(self, *args, at_weight: float = 1000.0, p: float = 2.0, ce_weight: float = 1.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("at", ATTerm(p, student_layers, teacher_layers, weight=at_weight))
