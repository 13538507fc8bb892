from __future__ import annotations

from torch import Tensor

from lightning_kd.features import embedding_name
from lightning_kd.losses import cc_loss
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput


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
        self.use_features(student_layer or embedding_name(self.student),
                          teacher_layer or embedding_name(self.teacher))

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        student_emb, = student_out.features.values()
        teacher_emb, = teacher_out.features.values()
        return {"cc": hp.cc_weight * cc_loss(student_emb, teacher_emb, hp.gamma, hp.p_order)}
