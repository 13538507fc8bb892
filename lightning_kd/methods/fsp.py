from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_kd.features import stage_names
from lightning_kd.losses.feature_extra import fsp_loss, fsp_matrix
from lightning_kd.methods.base import Batch
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.nn.adapters import channel_connector


class FSP(InitPhaseDistillation):
    """Flow-of-solution-procedure distillation (Yim et al., "A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning", CVPR 2017).

    Init phase (``init_epochs``): the student is trained on ``fsp_weight · Σ_l mean (G_s^l − G_t^l)²`` alone, ``G^l``
    the FSP matrix of stages ``l`` and ``l+1`` (:func:`~lightning_kd.losses.feature_extra.fsp_matrix`: mean over
    positions of channel products, the larger map pooled to the smaller) over the consecutive pairs of all stage
    outputs, stem included (RepDistiller's ``feat[:-1]``), and
    :func:`~lightning_kd.losses.feature_extra.fsp_loss` the batch and matrix mean. Then ``loss = ce_weight · CE``
    alone, as in the paper (stage 2: the main task) and the reference (its ``loss_kd = 0`` for FSP; the CRD script's
    ``-b 50`` has no effect). Defaults: the CRD CIFAR-100 setting (RepDistiller ``--distill fsp -r 1 -a 0 -b 50``,
    30 init epochs at the student's rate 0.05); the schedule and phase switch are those of
    :class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`.

    FSP matrices compare only when student and teacher stages have equal channel counts (the reference refuses
    other pairs). Where they differ, a trainable 1×1 convolution and BatchNorm maps the student's stage to the
    teacher's channels first (trained in the init phase, then frozen); the CRD pairs need none.

    Args:
        fsp_weight: weight of the summed FSP losses in the init phase.
        ce_weight: weight of the cross-entropy with the labels (after the init phase).
        init_epochs: epochs of FSP-only training.
        init_lr: learning rate of the init phase's SGD.
        student_layers: module names of the student's features, instead of all its stages (stem first).
        teacher_layers: module names of the teacher's, as many as the student's (at least two).
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; the connectors are chosen from the feature shapes of
            one dry forward pass on it: here when given, else in ``setup`` from the data (then stored in the
            hyper-parameters so that ``load_from_checkpoint`` rebuilds them).
    """

    def __init__(self, *args, fsp_weight: float = 1.0, ce_weight: float = 1.0, init_epochs: int = 30,
                 init_lr: float = 0.05, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        self.use_stage_pairs(student_layers or stage_names(self.student), teacher_layers or stage_names(self.teacher))
        if len(self.student_layers) < 2:
            raise ValueError(f"FSP relates consecutive layers, but got one pair ({self.student_layers[0]}, "
                             f"{self.teacher_layers[0]}): pass at least two student_layers and teacher_layers")
        self.connectors: nn.ModuleList | None = None
        self.init_projection(input_shape)

    def build_projections(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """A channel connector per stage where the counts differ (identity elsewhere)."""
        for layer, shape in zip([*self.student_layers, *self.teacher_layers], [*student_shapes, *teacher_shapes]):
            if len(shape) != 4:
                raise ValueError(f"FSP relates (N, C, H, W) feature maps, but layer {layer!r} gives shape "
                                 f"{tuple(shape)}: pass student_layers and teacher_layers of convolutional stages")
        self.connectors = nn.ModuleList(channel_connector(s[1], t[1]) for s, t in zip(student_shapes, teacher_shapes))

    def init_modules(self) -> list[nn.Module]:
        return [self.student, self.connectors]

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.connectors]

    def init_losses(self, batch: Batch) -> dict[str, Tensor]:
        student_feats = [c(f) for c, f in zip(self.connectors, self.forward_student(batch).features.values())]
        teacher_feats = list(self.forward_teacher(batch).features.values())
        loss = sum(fsp_loss(fsp_matrix(s_bottom, s_top), fsp_matrix(t_bottom, t_top))
                   for s_bottom, s_top, t_bottom, t_top in zip(student_feats, student_feats[1:],
                                                               teacher_feats, teacher_feats[1:]))
        return {"fsp": self.hparams.fsp_weight * loss}
