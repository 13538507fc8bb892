from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_kd.features import preactivation_layers
from lightning_kd.losses.feature_extra import ab_loss
from lightning_kd.methods.base import Batch
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.nn.adapters import boundary_connector


class AB(InitPhaseDistillation):
    """Activation-boundary distillation (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons", AAAI 2019).

    Init phase (``init_epochs``): student and connectors are trained on ``ab_weight · Σ_l 2^(l−L+1) ·
    ab_loss(c_l(s_l), t_l)`` alone, ``s_l``/``t_l`` the pre-activations (before the final ReLU) of the ``L`` stages
    after the stem, ``c_l`` the connector (identity when channels and size agree, else 1×1 convolution and
    BatchNorm), and :func:`~lightning_kd.losses.feature_extra.ab_loss` the margin hinge loss (sum over elements,
    batch mean). Then the connectors are frozen and ``loss = ce_weight · CE`` alone, as in the reference (its
    ``loss_kd = 0`` for AB; the CRD script's ``-b 1`` has no effect). Defaults: the CRD CIFAR-100 setting
    (RepDistiller ``--distill abound -r 1 -a 0 -b 1``, 30 init epochs at the student's rate 0.05, margin 1, stage
    weights ``2^(l−L+1)``, scale ``3/1000``); the schedule and phase switch are those of
    :class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`.

    Args:
        ab_weight: weight of the stage-weighted AB loss in the init phase (the reference's ``3/1000``).
        margin: margin ``μ`` of the hinge loss.
        ce_weight: weight of the cross-entropy with the labels (after the init phase).
        init_epochs: epochs of AB-only training.
        init_lr: learning rate of the init phase's SGD.
        student_layers: module names of the student's pre-activations, instead of ``stage_names(preact=True)``
            after the stem (models without that interface: the input of each stage's last ReLU).
        teacher_layers: module names of the teacher's, as many as the student's.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; the connectors are built from the feature shapes of
            one dry forward pass on it: here when given, else in ``setup`` from the data (then stored in the
            hyper-parameters so that ``load_from_checkpoint`` rebuilds them).
    """

    def __init__(self, *args, ab_weight: float = 3e-3, margin: float = 1.0, ce_weight: float = 1.0,
                 init_epochs: int = 30, init_lr: float = 0.05, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.use_stage_pairs(student_layers or preactivation_layers(self.student, "student", "AB"),
                             teacher_layers or preactivation_layers(self.teacher, "teacher", "AB"))
        self.connectors: nn.ModuleList | None = None
        self.init_projection(input_shape)

    def build_projections(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """One connector per stage pair, from the hooked features' shapes."""
        self.connectors = nn.ModuleList(boundary_connector(s, t) for s, t in zip(student_shapes, teacher_shapes))

    def init_modules(self) -> list[nn.Module]:
        return [self.student, self.connectors]

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.connectors]

    def init_losses(self, batch: Batch) -> dict[str, Tensor]:
        student_feats = self.forward_student(batch).features.values()
        teacher_feats = self.forward_teacher(batch).features.values()
        count, margin = len(self.connectors), self.hparams.margin
        loss = sum(2.0 ** (index - count + 1) * ab_loss(connector(s), t, margin)
                   for index, (connector, s, t) in enumerate(zip(self.connectors, student_feats, teacher_feats)))
        return {"ab": self.hparams.ab_weight * loss}
