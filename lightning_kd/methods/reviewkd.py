from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kd.features import embedding_name, preactivation_layers, stage_names
from lightning_kd.losses.feature_fusion import hcl_loss
from lightning_kd.methods.base import Batch, DistillationModule, LogitDistillationModule, ModelOutput
from lightning_kd.methods.ofd import paired_stages
from lightning_kd.nn.review import ReviewFusion, as_map


class ReviewKD(DistillationModule):
    """Knowledge review (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021).

    The student's stage outputs after the stem and its pooled embedding (as a 1×1 map) go, deepest first, through
    attention-based fusion modules (:class:`~lightning_kd.nn.review.ReviewFusion`): each level fuses its own stage
    with the fused deeper levels and is mapped to the channels and size of the matching teacher feature, the
    teacher's pre-ReLU stage outputs and its pooled embedding.
    ``loss = ce_weight · CE + reviewkd_weight · ramp · Σ_i HCL(F_i, t_i)``, HCL being the MSE of the maps plus that
    of their 4×4, 2×2 and 1×1 average-pooled versions, weighted 1, 1/2, 1/4, 1/8 and normalised
    (:func:`~lightning_kd.losses.feature_fusion.hcl_loss`, means over every element);
    ``ramp = min(epoch / warmup_epochs, 1)`` with epochs counted from 1, as mdistiller and the logit methods'
    :meth:`~lightning_kd.methods.base.LogitDistillationModule.warmup_ramp` (the official code counts from 0).

    Defaults: the official CIFAR-100 code (``dvlab-research/ReviewKD``: ``--kd-loss-weight 1.0``,
    ``--kd-warm-up 20``, CE 1, middle width ``min(512, C)`` of the student's embedding width ``C``, post-ReLU student
    stages, ``preact=True`` teacher stages) and mdistiller's ``REVIEWKD`` defaults. The loss weight is tuned per
    pair (5 for resnet32x4 → resnet8x4 in both the official script and mdistiller's config); set it in the config.

    Teacher pre-ReLU features come from ``stage_names(preact=True)`` for registered models and, for timm models,
    from the input of each stage's last ``nn.ReLU``, copied before an in-place ReLU overwrites it (see
    :func:`~lightning_kd.features.preactivation_layers`).

    Args:
        reviewkd_weight: weight of the summed HCL losses.
        ce_weight: weight of the cross-entropy with the labels.
        warmup_epochs: epochs of the linear ramp of the ReviewKD term (0: none).
        max_mid_channels: upper bound of the fused features' width.
        student_layers: module names of the student features, shallow to deep, instead of its stages after the
            stem plus its embedding.
        teacher_layers: likewise for the teacher, one per student layer.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``. The fusion modules are built from the feature shapes
            of one dry forward pass on it: here when given, else in ``setup`` from the first sample of the data,
            which is then stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds them before their
            weights load.
    """

    def __init__(self, *args, reviewkd_weight: float = 1.0, ce_weight: float = 1.0, warmup_epochs: int = 20,
                 max_mid_channels: int = 512, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        if student_layers is None and teacher_layers is None:
            student_stages, teacher_stages = paired_stages(None, None, stage_names(self.student)[1:],
                                                           preactivation_layers(self.teacher, "teacher", "ReviewKD"),
                                                           "ReviewKD")
            student_layers = student_stages + [embedding_name(self.student)]
            teacher_layers = teacher_stages + [embedding_name(self.teacher)]
        elif student_layers is None or teacher_layers is None:
            raise ValueError("ReviewKD pairs student and teacher layers in order: pass both student_layers and "
                             "teacher_layers, or neither")
        self.use_features(*paired_stages(student_layers, teacher_layers, [], [], "ReviewKD"))
        self.fusion: ReviewFusion | None = None
        self.init_projection(input_shape)

    def build_projections(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """The fusion modules, from the shapes of the hooked features (batch dimension first)."""
        self.fusion = ReviewFusion(student_shapes, teacher_shapes, self.hparams.max_mid_channels)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        if self.fusion is None:
            raise RuntimeError("ReviewKD's fusion modules are not built: pass input_shape or train through a Trainer "
                               "(setup builds them from the data)")
        fused = self.fusion(list(student_out.features.values()))
        teacher_feats = [as_map(feat) for feat in teacher_out.features.values()]
        loss = sum(hcl_loss(student_feat, teacher_feat) for student_feat, teacher_feat in zip(fused, teacher_feats))
        # the linear ramp of the logit methods (epochs counted from 1), on this module's epoch counter
        ramp = LogitDistillationModule.warmup_ramp(self, self.hparams.warmup_epochs)
        return {"reviewkd": self.hparams.reviewkd_weight * ramp * loss}
