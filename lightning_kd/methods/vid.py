from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_kd.losses.feature_extra import pool_to_common_size, vid_loss
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn.adapters import VIDRegressor


class VID(DistillationModule):
    """Variational information distillation (Ahn et al., "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019).

    For each stage pair a trainable regressor predicts the teacher's feature from the student's as a Gaussian:
    mean ``μ_l(s_l)`` (three 1×1 convolutions), per-channel variance ``σ_c² = softplus(α_c) + 1e-5``;
    ``loss = ce_weight · CE + vid_weight · Σ_l mean 0.5 · (log σ² + (t_l − μ_l(s_l))² / σ²)``, the mean over every
    element of the teacher feature (:func:`~lightning_kd.losses.feature_extra.vid_loss`), over the stage outputs
    between the stem and the global pooling paired in order (RepDistiller's ``feat[1:-1]``); a larger map is
    pooled to the smaller size first. Defaults: the CRD CIFAR-100 setting (RepDistiller ``--distill vid -r 1 -a 0
    -b 1``; regressor width = teacher channels, initial variance 5).

    Args:
        vid_weight: weight of the summed VID losses.
        ce_weight: weight of the cross-entropy with the labels.
        init_variance: initial variance of every channel.
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; the regressors are built from the feature shapes of
            one dry forward pass on it: here when given, else in ``setup`` from the data (then stored in the
            hyper-parameters so that ``load_from_checkpoint`` rebuilds them).
    """

    def __init__(self, *args, vid_weight: float = 1.0, ce_weight: float = 1.0, init_variance: float = 5.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.use_stage_pairs(student_layers, teacher_layers)
        self.regressors: nn.ModuleList | None = None
        self.init_projection(input_shape)

    def build_projections(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """One regressor per stage pair, from the hooked features' shapes."""
        for layer, shape in zip([*self.student_layers, *self.teacher_layers], [*student_shapes, *teacher_shapes]):
            if len(shape) != 4:
                raise ValueError(f"VID regresses (N, C, H, W) feature maps, but layer {layer!r} gives shape "
                                 f"{tuple(shape)}: pass student_layers and teacher_layers of convolutional stages")
        self.regressors = nn.ModuleList(
            VIDRegressor(s[1], t[1], t[1], init_variance=self.hparams.init_variance)
            for s, t in zip(student_shapes, teacher_shapes))

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        total = 0.0
        for regressor, s, t in zip(self.regressors, student_out.features.values(), teacher_out.features.values()):
            s, t = pool_to_common_size(s, t)
            total = total + vid_loss(regressor(s), t, regressor.variance())
        return {"vid": self.hparams.vid_weight * total}
