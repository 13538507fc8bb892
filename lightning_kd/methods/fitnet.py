from __future__ import annotations

from lightning_kd.features import hint_stage  # noqa: F401  (imported from here before)
from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import FitNetTerm


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

    The regressor is built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, fitnet_weight: float = 100.0, ce_weight: float = 1.0, hint_layer: int = 2,
                 projector: str = "conv_reg", student_layer: str | None = None, teacher_layer: str | None = None,
                 **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("fitnet", FitNetTerm(hint_layer, projector, student_layer, teacher_layer, weight=fitnet_weight))

    @property
    def projector(self):
        """The hint regressor (``None`` until built)."""
        return self.terms["fitnet"].projector
