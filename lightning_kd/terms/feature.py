"""Terms that distil from intermediate feature maps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kd.features import hint_stage, stage_pairs
from lightning_kd.losses import at_loss, fitnet_loss
from lightning_kd.nn import build_projector
from lightning_kd.terms.base import DistillationTerm


class FitNetTerm(DistillationTerm):
    """FitNets hints (Romero et al., ICLR 2015): ``{"fitnet": mean (r(f_s) − f_t)²}``, the mean over every element
    of the teacher's hint (:func:`~lightning_kd.losses.fitnet_loss`), ``r`` a trainable regressor built from the
    two features' shapes.

    Args:
        hint_layer: position of the hinted stage in both models' stage lists (stem = 0); a model with fewer stages
            uses its last one.
        projector: the regressor, one of :data:`lightning_kd.nn.PROJECTORS` (``"conv_reg"``: CRD's conv-BN-ReLU).
        student_layer: module name of the student's hinted feature, instead of ``hint_layer``.
        teacher_layer: module name of the teacher's hint, instead of ``hint_layer``.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, hint_layer: int = 2, projector: str = "conv_reg", student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.hint_layer, self.projector_name = hint_layer, projector
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.projector: nn.Module | None = None

    def layers(self, student, teacher):
        return ([self.student_layer or hint_stage(student, self.hint_layer)],
                [self.teacher_layer or hint_stage(teacher, self.hint_layer)])

    def build(self, student_shapes, teacher_shapes) -> None:
        self.projector = build_projector(self.projector_name, student_shapes[0], teacher_shapes[0])

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_hint, = self.student_features(student_out)
        teacher_hint, = self.teacher_features(teacher_out)
        return {"fitnet": fitnet_loss(self.projector(student_hint), teacher_hint)}


class ATTerm(DistillationTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``{"at": Σ_l mean_{b,j} (Q_s^l − Q_t^l)²}`` with
    ``Q = normalize(mean_c |f_c|^p)`` (:func:`~lightning_kd.losses.at_loss`), over layer pairs (by default each
    model's stages after the stem, paired in order).

    Args:
        p: exponent of the attention maps.
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, p: float = 2.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.p = p
        self.given_layers = (student_layers, teacher_layers)

    def layers(self, student, teacher):
        return stage_pairs(student, teacher, *self.given_layers, "AT")

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        pairs = zip(self.student_features(student_out), self.teacher_features(teacher_out))
        return {"at": sum(at_loss(s, t, self.p) for s, t in pairs)}
