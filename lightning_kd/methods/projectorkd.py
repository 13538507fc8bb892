from __future__ import annotations

from collections.abc import Sequence

import torch

from torch import Tensor, nn

from lightning_kd.features import embedding_name
from lightning_kd.losses import kd_loss, logsum_distance
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn import Linear


def pooled(feature: Tensor) -> Tensor:
    """``(N, C)`` from an embedding or, by global average pooling, from a feature map."""
    return feature.flatten(2).mean(-1) if feature.dim() > 2 else feature


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
        input_shape: shape of one input, e.g. ``(3, 32, 32)``. The projector is built from the feature shapes of
            one dry forward pass on this shape: here when given, else in ``setup`` from the first sample of the
            data, which is then stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds the
            projector before its weights load.
    """

    def __init__(self, *args, feat_weight: float = 2.0, alpha: float = 4.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, ce_weight: float = 1.0, bn_eps: float = 1e-4,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.use_features(student_layer or embedding_name(self.student),
                          teacher_layer or embedding_name(self.teacher))
        self.projector = self.student_norm = self.teacher_norm = None
        self.init_projection(input_shape)

    def build_projection(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        self.projector = Linear(student_shape[1], teacher_shape[1])
        self.student_norm = nn.BatchNorm1d(teacher_shape[1], eps=self.hparams.bn_eps, affine=False)
        self.teacher_norm = nn.BatchNorm1d(teacher_shape[1], eps=self.hparams.bn_eps, affine=False)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        student_feat, = student_out.features.values()
        teacher_feat, = teacher_out.features.values()
        student_z = self.student_norm(self.projector(pooled(student_feat)))
        teacher_z = self.teacher_norm(pooled(teacher_feat))
        losses = {"logsum": hp.feat_weight * logsum_distance(student_z, teacher_z, hp.alpha)}
        if hp.kd_weight:
            losses["kd"] = hp.kd_weight * kd_loss(student_out.logits, teacher_out.logits, hp.temperature)
        return losses
