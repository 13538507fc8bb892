from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import SPTerm


class SP(DistillationModule):
    """Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

    ``loss = ce_weight · CE + sp_weight · ‖G_s − G_t‖_F² / B²`` with ``G = row_normalize(F Fᵀ)`` the batch
    similarity matrix of the flattened features (:func:`~lightning_kd.losses.sp_loss`: mean over the ``B × B``
    entries), on the last stage's feature map before the global pooling (RepDistiller's ``feat[-2]``). Defaults:
    the CRD CIFAR-100 setting (RepDistiller ``--distill similarity -r 1 -a 0 -b 3000``).

    Args:
        sp_weight: weight of the similarity loss.
        ce_weight: weight of the cross-entropy with the labels.
        student_layer: module name of the student's feature, instead of its last stage.
        teacher_layer: module name of the teacher's feature, instead of its last stage.
    """

    def __init__(self, *args, sp_weight: float = 3000.0, ce_weight: float = 1.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("sp", SPTerm(student_layer, teacher_layer, weight=sp_weight))
