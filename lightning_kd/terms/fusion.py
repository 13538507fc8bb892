"""Terms that distil through trainable connections between many student and teacher stages (OFD's margin-clipped
connectors, ReviewKD's fusion)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.features import (
    INPUT_SUFFIX,
    check_layers,
    embedding_name,
    paired_stages,
    preactivation_layers,
    stage_names,
)
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin_from_bn
from lightning_kd.nn.projectors import ConvBN
from lightning_kd.nn.review import ReviewFusion, as_map
from lightning_kd.terms.base import DistillationTerm


def _module_name(layer: str) -> str:
    return layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer


def _join(parent: str, child: str) -> str:
    return ".".join(part for part in (parent, child) if part)


def preact_batchnorm(model: nn.Module, layer: str) -> str | None:
    """The BatchNorm whose output makes up the pre-ReLU feature ``layer`` (None when there is none).

    ``layer`` itself when it is a BatchNorm (WRN); the last BatchNorm inside it when it is a container (VGG
    blocks, MobileNetV2 groups); for a parameter-free leaf (a ``preact`` identity, the input of an activation) the
    last BatchNorm among its parent block's direct children, i.e. not in the shortcut (``bn2`` of a basic block,
    ``bn3`` of a bottleneck), as the official code's ``get_bn_before_relu``.
    """
    name = _module_name(layer)
    module = model.get_submodule(name)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return name
    if any(True for _ in module.children()):
        candidates = [_join(name, child) for child, sub in module.named_modules()
                      if isinstance(sub, nn.modules.batchnorm._BatchNorm)]
    else:
        parent = name.rpartition(".")[0]
        candidates = [_join(parent, child) for child, sub in model.get_submodule(parent).named_children()
                      if isinstance(sub, nn.modules.batchnorm._BatchNorm)]
    return candidates[-1] if candidates else None


class OFDTerm(DistillationTerm):
    """Overhaul of feature distillation (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019):
    ``{"ofd": Σ_i d_p(r_i(s_i), max(t_i, m_i)) / 2^(n-i-1)}``, ``s_i``/``t_i`` the pre-ReLU features of stage pair
    ``i`` of ``n`` (shallow to deep, so deeper stages weigh more), ``r_i`` a trainable 1×1 conv + BN connector
    (``connectors``), ``m_i = E[x | x < 0]`` the per-channel margin of a Gaussian with the mean ``β`` and std ``|γ|``
    of the teacher BatchNorm before the ReLU (:func:`~lightning_kd.losses.feature_fusion.ofd_margin_from_bn`,
    computed from the host's teacher when the connectors are built and kept as buffers ``margin_<i>``), ``d_p`` the
    partial L2 that skips positions where the student is below a non-positive teacher response, summed over
    channels and positions and averaged over the batch (:func:`~lightning_kd.losses.feature_fusion.ofd_loss`). A
    teacher map of another size is average-pooled to the student's.

    Layers: by default the models' pre-activation stages after the stem (``stage_names(preact=True)``, else the
    input of each stage's last ``nn.ReLU``), the longer list keeping its deepest stages; each margin's BatchNorm is
    found from its teacher layer (:func:`preact_batchnorm`).

    Args:
        student_layers: module names of the student's pre-ReLU features (``name:input`` for an activation's input),
            instead of its pre-activation stages.
        teacher_layers: likewise for the teacher, one per student layer.
        teacher_bns: names of the teacher BatchNorms whose ``γ``, ``β`` give each teacher layer's margins, instead
            of the ones found from ``teacher_layers``.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 teacher_bns: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.given_layers = (student_layers, teacher_layers)
        self.given_bns = teacher_bns
        self.teacher_bns: list[str] = []
        self.connectors: nn.ModuleList | None = None

    def layers(self, student, teacher):
        student_layers, teacher_layers = self.given_layers
        hint = " and teacher_bns=[...]"
        default_student = [] if student_layers is not None else preactivation_layers(student, "student", "OFD", hint)
        default_teacher = [] if teacher_layers is not None else preactivation_layers(teacher, "teacher", "OFD", hint)
        student_layers, teacher_layers = paired_stages(student_layers, teacher_layers, default_student,
                                                       default_teacher, "OFD")
        check_layers(teacher, teacher_layers, "teacher")
        self.teacher_bns = self._margin_batchnorms(teacher, teacher_layers)
        return student_layers, teacher_layers

    def _margin_batchnorms(self, teacher: nn.Module, teacher_layers: list[str]) -> list[str]:
        if self.given_bns is None:
            found = [preact_batchnorm(teacher, layer) for layer in teacher_layers]
            missing = [layer for layer, name in zip(teacher_layers, found) if name is None]
            if missing:
                raise ValueError(f"OFD takes each teacher layer's margin from the BatchNorm before its ReLU, but found "
                                 f"none for {', '.join(missing)} in the teacher ({type(teacher).__name__}): "
                                 "pass teacher_bns=[...] with one BatchNorm module name per teacher layer")
            return found
        names = check_layers(teacher, self.given_bns, "teacher")
        if len(names) != len(teacher_layers):
            raise ValueError(f"OFD needs one teacher BatchNorm per teacher layer, but got {len(names)} teacher_bns for "
                             f"{len(teacher_layers)} teacher layers ({', '.join(teacher_layers)})")
        for name in names:
            if not isinstance(teacher.get_submodule(name), nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"teacher_bns must name BatchNorm modules, but {name!r} of the teacher is a "
                                 f"{type(teacher.get_submodule(name)).__name__}: name the BatchNorm whose output "
                                 "feeds the teacher layer's ReLU")
        return names

    def build(self, student_shapes, teacher_shapes) -> None:
        teacher = self.host.teacher
        connectors = []
        for i, (student_shape, teacher_shape, bn_name) in enumerate(zip(student_shapes, teacher_shapes,
                                                                        self.teacher_bns)):
            bn = teacher.get_submodule(bn_name)
            if len(student_shape) < 2 or len(student_shape) != len(teacher_shape):
                raise ValueError(f"OFD compares feature maps of one rank, but student layer {self.student_layers[i]!r} "
                                 f"gives {tuple(student_shape[1:])} and teacher layer {self.teacher_layers[i]!r} "
                                 f"{tuple(teacher_shape[1:])}: hook matching layers (student_layers=/teacher_layers=)")
            if bn.num_features != teacher_shape[1]:
                raise ValueError(f"the teacher BatchNorm {bn_name!r} has {bn.num_features} channels but teacher layer "
                                 f"{self.teacher_layers[i]!r} has {teacher_shape[1]}: pass teacher_bns=[...] naming "
                                 "the BatchNorm that feeds each teacher layer's ReLU")
            connectors.append(ConvBN(student_shape[1], teacher_shape[1]))
            self.register_buffer(f"margin_{i}", ofd_margin_from_bn(bn))
        self.connectors = nn.ModuleList(connectors)

    @property
    def margins(self) -> list[Tensor]:
        """The teacher margins of the stages, shallow to deep."""
        return [getattr(self, f"margin_{i}") for i in range(len(self.teacher_bns))]

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        pairs = list(zip(self.student_features(student_out), self.teacher_features(teacher_out), self.connectors,
                         self.margins))
        total = 0.0
        for i, (student_feat, teacher_feat, connector, margin) in enumerate(pairs):
            student_feat = connector(student_feat)
            if teacher_feat.dim() == 4 and teacher_feat.shape[-2:] != student_feat.shape[-2:]:
                teacher_feat = F.adaptive_avg_pool2d(teacher_feat, student_feat.shape[-2:])
            total = total + ofd_loss(student_feat, teacher_feat, margin) / 2 ** (len(pairs) - i - 1)
        return {"ofd": total}


class ReviewKDTerm(DistillationTerm):
    """Knowledge review (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021): ``{"reviewkd": Σ_i
    HCL(F_i, t_i)}``, ``F_i`` the student features fused deepest first by attention-based fusion modules
    (``fusion``, :class:`~lightning_kd.nn.review.ReviewFusion`: each level fuses its own stage with the fused deeper
    levels and is mapped to the channels and size of teacher feature ``t_i``), HCL the MSE of the maps plus that of
    their 4×4, 2×2 and 1×1 average-pooled versions, weighted 1, 1/2, 1/4, 1/8 and normalised
    (:func:`~lightning_kd.losses.feature_fusion.hcl_loss`, means over every element); pooled embeddings count as
    1×1 maps. The paper ramps the term in over 20 epochs (``warmup_epochs``).

    Layers: by default the student's stages after the stem (post-ReLU) plus its embedding, and the teacher's
    pre-activation stages (``stage_names(preact=True)``, else the input of each stage's last ``nn.ReLU``) plus its
    embedding, the longer stage list keeping its deepest stages.

    Args:
        max_mid_channels: upper bound of the fused features' width (the official ``min(512, C)``).
        student_layers: module names of the student features, shallow to deep, instead of the defaults.
        teacher_layers: likewise for the teacher, one per student layer.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, max_mid_channels: int = 512, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if (student_layers is None) != (teacher_layers is None):
            raise ValueError("ReviewKD pairs student and teacher layers in order: pass both student_layers and "
                             "teacher_layers, or neither")
        self.max_mid_channels = max_mid_channels
        self.given_layers = (student_layers, teacher_layers)
        self.fusion: ReviewFusion | None = None

    def layers(self, student, teacher):
        student_layers, teacher_layers = self.given_layers
        if student_layers is None:
            student_stages, teacher_stages = paired_stages(None, None, stage_names(student)[1:],
                                                           preactivation_layers(teacher, "teacher", "ReviewKD"),
                                                           "ReviewKD")
            student_layers = student_stages + [embedding_name(student)]
            teacher_layers = teacher_stages + [embedding_name(teacher)]
        return paired_stages(student_layers, teacher_layers, [], [], "ReviewKD")

    def build(self, student_shapes, teacher_shapes) -> None:
        self.fusion = ReviewFusion(student_shapes, teacher_shapes, self.max_mid_channels)

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        fused = self.fusion(self.student_features(student_out))
        teacher_feats = [as_map(feat) for feat in self.teacher_features(teacher_out)]
        return {"reviewkd": sum(hcl_loss(s, t) for s, t in zip(fused, teacher_feats))}
