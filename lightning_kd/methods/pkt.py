from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import PKTTerm


class PKT(DistillationModule):
    """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018).

    ``loss = ce_weight · CE + pkt_weight · mean_{i,j} p_t[j|i] log(p_t[j|i] / p_s[j|i])`` with ``p[j|i]`` the
    row-normalised cosine kernel ``(cos(x_i, x_j) + 1) / 2`` of the pooled embeddings
    (:func:`~lightning_kd.losses.pkt_loss`: mean over the ``B × B`` entries). Defaults: the CRD CIFAR-100 setting
    (RepDistiller ``--distill pkt -r 1 -a 0 -b 30000``, on ``feat[-1]``, the embedding).

    Args:
        pkt_weight: weight of the PKT loss.
        ce_weight: weight of the cross-entropy with the labels.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
    """

    def __init__(self, *args, pkt_weight: float = 30000.0, ce_weight: float = 1.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("pkt", PKTTerm(student_layer, teacher_layer, weight=pkt_weight))
