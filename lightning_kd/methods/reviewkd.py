from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import ReviewKDTerm


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
    :meth:`~lightning_kd.methods.base.DistillationModule.warmup_ramp` (the official code counts from 0).

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

    The fusion modules are built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, reviewkd_weight: float = 1.0, ce_weight: float = 1.0, warmup_epochs: int = 20,
                 max_mid_channels: int = 512, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("reviewkd", ReviewKDTerm(max_mid_channels, student_layers, teacher_layers,
                                               weight=reviewkd_weight, warmup_epochs=warmup_epochs))

    @property
    def fusion(self):
        """The fusion modules (``None`` until built)."""
        return self.terms["reviewkd"].fusion
