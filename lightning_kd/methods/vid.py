from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import VIDTerm


class VID(DistillationModule):
    """Variational information distillation (Ahn et al., "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019).

    For each stage pair a trainable regressor predicts the teacher's feature from the student's as a Gaussian:
    mean ``μ_l(s_l)`` (three 1×1 convolutions), per-channel variance ``σ_c² = softplus(α_c) + 1e-5``;
    ``loss = ce_weight · CE + vid_weight · Σ_l mean 0.5 · (log σ² + (t_l − μ_l(s_l))² / σ²)``, the mean over every
    element of the teacher feature (:func:`~lightning_kd.losses.feature.vid_loss`), over the stage outputs
    between the stem and the global pooling paired in order (RepDistiller's ``feat[1:-1]``); a larger map is
    pooled to the smaller size first. Defaults: the CRD CIFAR-100 setting (RepDistiller ``--distill vid -r 1 -a 0
    -b 1``; regressor width = teacher channels, initial variance 5).

    Args:
        vid_weight: weight of the summed VID losses.
        ce_weight: weight of the cross-entropy with the labels.
        init_variance: initial variance of every channel.
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.

    The regressors are built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, vid_weight: float = 1.0, ce_weight: float = 1.0, init_variance: float = 5.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("vid", VIDTerm(init_variance, student_layers, teacher_layers, weight=vid_weight))

    @property
    def regressors(self):
        """The per-stage regressors (``None`` until built)."""
        return self.terms["vid"].regressors
