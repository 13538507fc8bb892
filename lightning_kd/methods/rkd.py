from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import RKDTerm


class RKD(DistillationModule):
    """Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    ``loss = ce_weight · CE + rkd_weight · (w_d · huber(d_s/μ_s − d_t/μ_t) + w_a · huber(cos∠_s − cos∠_t))``
    over the pairwise distances (normalised by their mean) and the triplet angles of the pooled embeddings
    (:func:`~lightning_kd.losses.rkd_loss`: smooth-L1 averaged over the ``B²`` pairs and ``B³`` triplets).
    Defaults: ``w_d = 25``, ``w_a = 50`` (the paper's), and the CRD CIFAR-100 setting (RepDistiller
    ``--distill rkd -r 1 -a 0 -b 1``, on ``feat[-1]``, the embedding).

    Args:
        distance_weight: weight ``w_d`` of the distance-wise term.
        angle_weight: weight ``w_a`` of the angle-wise term.
        rkd_weight: weight of the whole RKD loss.
        ce_weight: weight of the cross-entropy with the labels.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
    """

    def __init__(self, *args, distance_weight: float = 25.0, angle_weight: float = 50.0, rkd_weight: float = 1.0,
                 ce_weight: float = 1.0, student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("rkd", RKDTerm(distance_weight, angle_weight, student_layer, teacher_layer, weight=rkd_weight))
