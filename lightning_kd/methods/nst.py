from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import NSTTerm


class NST(DistillationModule):
    """Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", arXiv:1707.01219, 2017).

    ``loss = ce_weight · CE + nst_weight · Σ_l MMD²_l`` with the squared maximum mean discrepancy between the
    student's and the teacher's channel activation patterns of stage ``l`` under the polynomial kernel
    ``k(x, y) = (x·y)²`` (:func:`~lightning_kd.losses.nst_loss`: each kernel term averaged over the batch and the
    channel pairs), summed over the stage outputs between the stem and the global pooling, paired in order.
    Defaults: the CRD CIFAR-100 setting (RepDistiller ``--distill nst -r 1 -a 0 -b 50``).

    Args:
        nst_weight: weight of the summed NST losses.
        ce_weight: weight of the cross-entropy with the labels.
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
    """

    def __init__(self, *args, nst_weight: float = 50.0, ce_weight: float = 1.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("nst", NSTTerm(student_layers, teacher_layers, weight=nst_weight))
