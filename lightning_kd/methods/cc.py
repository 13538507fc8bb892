from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import CCTerm


class CC(DistillationModule):
    """Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019).

    ``loss = ce_weight · CE + cc_weight · mean_{i,j} (C_s[i,j] − C_t[i,j])²`` with ``C`` the order-``P`` Taylor
    expansion of the Gaussian RBF kernel ``exp(−γ‖x_i − x_j‖²)`` of the L2-normalised pooled embeddings
    (:func:`~lightning_kd.losses.cc_loss`: mean over the ``B × B`` matrix). Defaults: the setting of the
    Taylor-kernel reference implementation (AberHu/Knowledge-Distillation-Zoo, ``example_train_script.sh``:
    ``--kd_mode cc --lambda_kd 100 --gamma 0.4 --P_order 2`` on the pooled embedding, CE weight 1). That script
    runs CIFAR-10; RepDistiller's CIFAR-100 weight 0.02 belongs to a different reduction and an extra embedding,
    so it does not transfer.

    Args:
        cc_weight: weight of the correlation loss.
        gamma: RBF kernel parameter γ.
        p_order: order ``P`` of the Taylor expansion.
        ce_weight: weight of the cross-entropy with the labels.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
    """

    def __init__(self, *args, cc_weight: float = 100.0, gamma: float = 0.4, p_order: int = 2, ce_weight: float = 1.0,
                 student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("cc", CCTerm(gamma, p_order, student_layer, teacher_layer, weight=cc_weight))
