from __future__ import annotations

from collections.abc import Sequence

import torch

from torch import Tensor

from lightning_kd.features import stage_names
from lightning_kd.losses import fitnet_loss
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn import build_projector


def hint_stage(model, index: int) -> str:
    """The stage ``index`` of the model's stage list (stem = 0), or its last stage when it has fewer."""
    stages = stage_names(model)
    return stages[min(index, len(stages) - 1)]


class FitNet(DistillationModule):
    """FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), single-stage as in the CRD
    benchmark (Tian et al., ICLR 2020).

    ``loss = ce_weight · CE + fitnet_weight · mean (r(f_s) − f_t)²``, the mean over every element of the teacher's
    hint ``f_t`` (:func:`~lightning_kd.losses.fitnet_loss`), ``r`` the trainable regressor (``projector``) trained
    with the student from the start. Defaults: the CRD CIFAR-100 setting (RepDistiller ``train_student.py
    --distill hint -r 1 -a 0 -b 100``, ``hint_layer=2``, regressor ``ConvReg``).

    Args:
        fitnet_weight: weight of the hint loss.
        ce_weight: weight of the cross-entropy with the labels.
        hint_layer: position of the hinted stage in both models' stage lists (stem = 0; 2 is the output of the
            second residual stage of a CIFAR ResNet); a model with fewer stages uses its last one.
        projector: the regressor, one of :data:`lightning_kd.nn.PROJECTORS` (``"conv_reg"``: CRD's conv-BN-ReLU).
        student_layer: module name of the student's hinted feature, instead of ``hint_layer``.
        teacher_layer: module name of the teacher's hint, instead of ``hint_layer``.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``. The regressor is built from the feature shapes of
            one dry forward pass on this shape: here when given, else in ``setup`` from the first sample of the
            data, which is then stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds the
            regressor before its weights load.
    """

    def __init__(self, *args, fitnet_weight: float = 100.0, ce_weight: float = 1.0, hint_layer: int = 2,
                 projector: str = "conv_reg", student_layer: str | None = None, teacher_layer: str | None = None,
                 input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.use_features(student_layer or hint_stage(self.student, hint_layer),
                          teacher_layer or hint_stage(self.teacher, hint_layer))
        self.projector = None
        self.init_projection(input_shape)

    def build_projection(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        self.projector = build_projector(self.hparams.projector, student_shape, teacher_shape)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        student_hint, = student_out.features.values()
        teacher_hint, = teacher_out.features.values()
        return {"fitnet": self.hparams.fitnet_weight * fitnet_loss(self.projector(student_hint), teacher_hint)}
