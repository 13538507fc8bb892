from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import KDTerm, ProjectorKDTerm
from lightning_kd.terms.feature import pooled  # noqa: F401  (imported from here before)


class ProjectorKD(DistillationModule):
    """Distillation through a linear projector onto batch-normalised teacher embeddings (Miles & Mikolajczyk,
    "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024).

    ``loss = ce_weight · CE + feat_weight · log Σ_{b,d} |BN(W z_s + c) − BN(z_t)|^α + kd_weight · T² · KL(t ‖ s)``
    with ``z`` the pooled embeddings, ``W z_s + c`` the trainable linear projector, ``BN`` batch normalisation
    without affine parameters (batch statistics in training, ``eps = 1e-4``, one for each side) and the
    LogSum distance summed over batch and dimensions (:func:`~lightning_kd.losses.logsum_distance`); the KD term
    is :func:`~lightning_kd.losses.kd_loss` (batch mean). The official code (``roymiles/Simple-Recipe-Distillation``,
    ResNet-34 → ResNet-18 on ImageNet) publishes one setting, used here as defaults: ``α = 4``, feature weight 2,
    KD with ``T = 1`` and weight 1, CE weight 1. That repository and torchdistill (``SRDLoss``) call the method
    "SRD" (simple recipe distillation), a name taken here by :class:`~lightning_kd.methods.SRD` (Yang et al.).

    Args:
        feat_weight: weight of the LogSum feature distance.
        alpha: exponent of the absolute differences in the LogSum distance.
        kd_weight: weight of the KD term on the logits (0 disables it).
        temperature: temperature of the KD term.
        ce_weight: weight of the cross-entropy with the labels.
        bn_eps: epsilon of the two normalisations.
        student_layer: module name of the student's feature, instead of its embedding (maps are average-pooled).
        teacher_layer: module name of the teacher's feature, instead of its embedding.

    The projector is built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, feat_weight: float = 2.0, alpha: float = 4.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, ce_weight: float = 1.0, bn_eps: float = 1e-4,
                 student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("projectorkd", ProjectorKDTerm(alpha, bn_eps, student_layer, teacher_layer, weight=feat_weight))
        if kd_weight:
            self.add_term("kd", KDTerm(temperature, weight=kd_weight))

    @property
    def projector(self):
        """The linear projector of the student's embedding (``None`` until built)."""
        return self.terms["projectorkd"].projector

    @property
    def student_norm(self):
        """The normalisation of the projected student embedding (``None`` until built)."""
        return self.terms["projectorkd"].student_norm

    @property
    def teacher_norm(self):
        """The normalisation of the teacher embedding (``None`` until built)."""
        return self.terms["projectorkd"].teacher_norm
