"""Terms that distil the relations between the samples of a batch (similarities, distances, angles, kernels)."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.features import embedding_name, stage_names
from lightning_kd.losses import cc_loss, pkt_loss, rkd_loss, sp_loss
from lightning_kd.terms.base import DistillationTerm


class _OneLayerTerm(DistillationTerm):
    """A term on one student and one teacher layer, by default the models' pooled embeddings."""

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer

    @staticmethod
    def default_layer(model) -> str:
        return embedding_name(model)

    def layers(self, student, teacher):
        return ([self.student_layer or self.default_layer(student)],
                [self.teacher_layer or self.default_layer(teacher)])

    def feature_pair(self, student_out, teacher_out) -> tuple[Tensor, Tensor]:
        student_feat, = self.student_features(student_out)
        teacher_feat, = self.teacher_features(teacher_out)
        return student_feat, teacher_feat


class SPTerm(_OneLayerTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ``{"sp": ‖G_s − G_t‖_F² / B²}`` with ``G =
    row_normalize(F Fᵀ)`` the batch similarity matrix of the flattened features (:func:`~lightning_kd.losses.sp_loss`:
    mean over the ``B × B`` entries), by default on each model's last stage before the global pooling
    (RepDistiller's ``feat[-2]``).

    Args:
        student_layer: module name of the student's feature, instead of its last stage.
        teacher_layer: module name of the teacher's feature, instead of its last stage.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(student_layer, teacher_layer, **kwargs)

    @staticmethod
    def default_layer(model) -> str:
        return stage_names(model)[-1]

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        return {"sp": sp_loss(*self.feature_pair(student_out, teacher_out))}


class PKTTerm(_OneLayerTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): ``{"pkt": mean_{i,j} p_t[j|i] log(p_t[j|i] /
    p_s[j|i])}`` with ``p[j|i]`` the row-normalised cosine kernel ``(cos(x_i, x_j) + 1) / 2``
    (:func:`~lightning_kd.losses.pkt_loss`: mean over the ``B × B`` entries), by default on the pooled embeddings.

    Args:
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(student_layer, teacher_layer, **kwargs)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        return {"pkt": pkt_loss(*self.feature_pair(student_out, teacher_out))}


class RKDTerm(_OneLayerTerm):
    """Relational KD (Park et al., CVPR 2019): ``{"rkd": w_d · huber(d_s/μ_s − d_t/μ_t) + w_a · huber(cos∠_s −
    cos∠_t)}`` over the pairwise distances (normalised by their mean) and the triplet angles
    (:func:`~lightning_kd.losses.rkd_loss`: smooth-L1 averaged over the ``B²`` pairs and ``B³`` triplets), by
    default on the pooled embeddings. Defaults ``w_d = 25``, ``w_a = 50``: the paper's.

    Args:
        distance_weight: weight ``w_d`` of the distance-wise loss.
        angle_weight: weight ``w_a`` of the angle-wise loss.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(student_layer, teacher_layer, **kwargs)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_emb, teacher_emb = self.feature_pair(student_out, teacher_out)
        return {"rkd": rkd_loss(student_emb, teacher_emb, self.distance_weight, self.angle_weight)}


class CCTerm(_OneLayerTerm):
    """Correlation congruence (Peng et al., ICCV 2019): ``{"cc": mean_{i,j} (C_s[i,j] − C_t[i,j])²}`` with ``C`` the
    order-``P`` Taylor expansion of the Gaussian RBF kernel ``exp(−γ‖x_i − x_j‖²)`` of the L2-normalised features
    (:func:`~lightning_kd.losses.cc_loss`: mean over the ``B × B`` matrix), by default on the pooled embeddings.
    Defaults ``γ = 0.4``, ``P = 2``: the Taylor-kernel reference implementation (AberHu/Knowledge-Distillation-Zoo).

    Args:
        gamma: RBF kernel parameter γ.
        p_order: order ``P`` of the Taylor expansion.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, gamma: float = 0.4, p_order: int = 2, student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(student_layer, teacher_layer, **kwargs)
        self.gamma, self.p_order = gamma, p_order

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_emb, teacher_emb = self.feature_pair(student_out, teacher_out)
        return {"cc": cc_loss(student_emb, teacher_emb, self.gamma, self.p_order)}
