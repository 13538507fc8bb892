"""Terms that distil from intermediate feature maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.features import check_layers, classifier_name, embedding_name, hint_stage, stage_pairs
from lightning_kd.losses import at_loss, fitnet_loss, logsum_distance, nst_loss, pool_to_common_size, vid_loss
from lightning_kd.nn import ConvBN, Linear, VIDRegressor, build_projector
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


class NSTTerm(DistillationTerm):
    """Neuron selectivity transfer (Huang & Wang, arXiv:1707.01219, 2017): ``{"nst": Σ_l MMD²_l}``, the squared
    maximum mean discrepancy between the student's and the teacher's channel activation patterns under the
    polynomial kernel ``k(x, y) = (x·y)²`` (:func:`~lightning_kd.losses.nst_loss`: each kernel term averaged over the
    batch and the channel pairs), over layer pairs (by default each model's stages after the stem, paired in order).

    Args:
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.given_layers = (student_layers, teacher_layers)

    def layers(self, student, teacher):
        return stage_pairs(student, teacher, *self.given_layers, "NST")

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        pairs = zip(self.student_features(student_out), self.teacher_features(teacher_out))
        return {"nst": sum(nst_loss(s, t) for s, t in pairs)}


class VIDTerm(DistillationTerm):
    """Variational information distillation (Ahn et al., CVPR 2019): ``{"vid": Σ_l mean 0.5 · (log σ² + (t_l −
    μ_l(s_l))² / σ²)}``, the mean over every element of the teacher feature
    (:func:`~lightning_kd.losses.feature.vid_loss`), ``μ_l`` three trainable 1×1 convolutions and
    ``σ_c² = softplus(α_c) + 1e-5`` a trainable variance per teacher channel (one
    :class:`~lightning_kd.nn.adapters.VIDRegressor` per layer pair, in ``regressors``, width = teacher channels); a
    larger map is average-pooled to the smaller size first. Layer pairs: by default each model's stages after the
    stem, paired in order.

    Args:
        init_variance: initial variance of every channel (RepDistiller: 5).
        student_layers: module names of the student's paired features, instead of its stages after the stem.
        teacher_layers: module names of the teacher's paired features, as many as the student's.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, init_variance: float = 5.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.init_variance = init_variance
        self.given_layers = (student_layers, teacher_layers)
        self.regressors: nn.ModuleList | None = None

    def layers(self, student, teacher):
        return stage_pairs(student, teacher, *self.given_layers, "VID")

    def build(self, student_shapes, teacher_shapes) -> None:
        for layer, shape in zip([*self.student_layers, *self.teacher_layers], [*student_shapes, *teacher_shapes]):
            if len(shape) != 4:
                raise ValueError(f"VID regresses (N, C, H, W) feature maps, but layer {layer!r} gives shape "
                                 f"{tuple(shape)}: pass student_layers and teacher_layers of convolutional stages")
        self.regressors = nn.ModuleList(VIDRegressor(s[1], t[1], t[1], init_variance=self.init_variance)
                                        for s, t in zip(student_shapes, teacher_shapes))

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        total = 0.0
        for regressor, s, t in zip(self.regressors, self.student_features(student_out),
                                   self.teacher_features(teacher_out)):
            s, t = pool_to_common_size(s, t)
            total = total + vid_loss(regressor(s), t, regressor.variance())
        return {"vid": total}


def pooled(feature: Tensor) -> Tensor:
    """``(N, C)`` from an embedding or, by global average pooling, from a feature map."""
    return feature.flatten(2).mean(-1) if feature.dim() > 2 else feature


class ProjectorKDTerm(DistillationTerm):
    """The projector's feature loss of Miles & Mikolajczyk ("Understanding the Role of the Projector in Knowledge
    Distillation", AAAI 2024): ``{"logsum": log Σ_{b,d} |BN(W z_s + c) − BN(z_t)|^α}``, ``z`` the pooled
    embeddings, ``W z_s + c`` the trainable linear ``projector``, ``BN`` batch normalisation without affine
    parameters (``student_norm``, ``teacher_norm``: batch statistics in training), the LogSum distance summed over
    batch and dimensions (:func:`~lightning_kd.losses.logsum_distance`). Defaults: the official code's ``α = 4``,
    ``eps = 1e-4``.

    Args:
        alpha: exponent of the absolute differences in the LogSum distance.
        bn_eps: epsilon of the two normalisations.
        student_layer: module name of the student's feature, instead of its embedding (maps are average-pooled).
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, alpha: float = 4.0, bn_eps: float = 1e-4, student_layer: str | None = None,
                 teacher_layer: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.bn_eps = alpha, bn_eps
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.projector: nn.Module | None = None
        self.student_norm: nn.Module | None = None
        self.teacher_norm: nn.Module | None = None

    def layers(self, student, teacher):
        return [self.student_layer or embedding_name(student)], [self.teacher_layer or embedding_name(teacher)]

    def build(self, student_shapes, teacher_shapes) -> None:
        student_channels, teacher_channels = student_shapes[0][1], teacher_shapes[0][1]
        self.projector = Linear(student_channels, teacher_channels)
        self.student_norm = nn.BatchNorm1d(teacher_channels, eps=self.bn_eps, affine=False)
        self.teacher_norm = nn.BatchNorm1d(teacher_channels, eps=self.bn_eps, affine=False)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_feat, = self.student_features(student_out)
        teacher_feat, = self.teacher_features(teacher_out)
        student_z = self.student_norm(self.projector(pooled(student_feat)))
        teacher_z = self.teacher_norm(pooled(teacher_feat))
        return {"logsum": logsum_distance(student_z, teacher_z, self.alpha)}


class SRDTerm(DistillationTerm):
    """Softmax regression representation learning (Yang et al., "Knowledge Distillation via Softmax Regression
    Representation Learning", ICLR 2021): ``{"fm": fm_weight · mean (r(z_s) − z_t)², "sr": sr_weight · mean (W_t
    r(z_s) − t)²}``, ``r`` the trainable connector (1×1 convolution, BatchNorm, ReLU: ``projector``) from the
    student's pooled embedding to the teacher's, ``W_t`` the teacher's frozen classifier (read from the host's
    teacher; gradients reach the student through it), ``t`` the teacher's logits; both MSE means over batch and
    dimensions (feature matching and softmax regression, as the official ``jingyang2017/KD_SRRL``).

    Args:
        fm_weight: factor of the feature-matching MSE.
        sr_weight: factor of the softmax-regression MSE.
        student_layer: module name of the student's embedding (default: from the model's feature interface).
        teacher_layer: module name of the teacher's embedding, the input of ``teacher_classifier``.
        teacher_classifier: module name of the teacher's final linear layer (default: from the model's feature
            interface).
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, fm_weight: float = 1.0, sr_weight: float = 1.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, teacher_classifier: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fm_weight, self.sr_weight = fm_weight, sr_weight
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.teacher_classifier = teacher_classifier
        self.teacher_classifier_name: str | None = None
        self.projector: nn.Module | None = None

    def layers(self, student, teacher):
        self.teacher_classifier_name, = check_layers(teacher, self.teacher_classifier or classifier_name(teacher),
                                                     "teacher")
        return [self.student_layer or embedding_name(student)], [self.teacher_layer or embedding_name(teacher)]

    def build(self, student_shapes, teacher_shapes) -> None:
        student_shape, teacher_shape = student_shapes[0], teacher_shapes[0]
        if len(student_shape) != 2 or len(teacher_shape) != 2:
            raise ValueError(f"SRD connects (N, C) embeddings, got student {tuple(student_shape)} and teacher "
                             f"{tuple(teacher_shape)}: hook the pooled embeddings (the teacher's is its classifier's "
                             "input)")
        self.projector = ConvBN(student_shape[1], teacher_shape[1], relu=True)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_emb, = self.student_features(student_out)
        teacher_emb, = self.teacher_features(teacher_out)
        connected = self.projector(student_emb)
        regressed_logits = self.host.teacher.get_submodule(self.teacher_classifier_name)(connected)
        return {"fm": self.fm_weight * fitnet_loss(connected, teacher_emb),
                "sr": self.sr_weight * F.mse_loss(regressed_logits.float(), teacher_out.logits.float())}
