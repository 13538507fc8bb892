from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.features import INPUT_SUFFIX, check_layers, preactivation_layers
from lightning_kd.losses.feature_fusion import ofd_loss, ofd_margin_from_bn
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn.projectors import ConvBN


# ------------------------------------------------------------------------------------ pre-ReLU stage features
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


def paired_stages(student: list[str] | None, teacher: list[str] | None, default_student: list[str],
                  default_teacher: list[str], method: str) -> tuple[list[str], list[str]]:
    """Student and teacher layers paired in order. Defaults of different lengths keep the deepest stages of the
    longer list (mdistiller's ``_align_list``); explicit lists must be equally long."""
    if student is None and teacher is None:
        count = min(len(default_student), len(default_teacher))
        return default_student[len(default_student) - count:], default_teacher[len(default_teacher) - count:]
    student = list(student) if student is not None else default_student
    teacher = list(teacher) if teacher is not None else default_teacher
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{method} pairs student and teacher layers in order, but got {len(student)} student layers "
                         f"({', '.join(student)}) and {len(teacher)} teacher layers ({', '.join(teacher)}): pass "
                         "student_layers and teacher_layers of equal length")
    return student, teacher


# ------------------------------------------------------------------------------------------------------ method
class OFD(DistillationModule):
    """Overhaul of feature distillation (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).

    At every stage after the stem, the student's pre-ReLU feature goes through a trainable connector (1×1 conv +
    BN, :class:`~lightning_kd.nn.projectors.ConvBN`) to the teacher's pre-ReLU feature, clipped from below by a
    per-channel margin ``m = E[x | x < 0]`` of a Gaussian with the mean ``β`` and std ``|γ|`` of the teacher
    BatchNorm that produces it (:func:`~lightning_kd.losses.feature_fusion.ofd_margin_from_bn`):
    ``loss = ce_weight · CE + ofd_weight · Σ_i d_p(r_i(s_i), max(t_i, m_i)) / 2^(n-i-1)`` where the partial L2
    ``d_p`` skips positions where the student is below a non-positive teacher response, summed over channels and
    positions and averaged over the batch (:func:`~lightning_kd.losses.feature_fusion.ofd_loss`); deeper stages
    weigh more. A teacher map larger or smaller than the student's is average-pooled to its size (mdistiller).

    Defaults: the official CIFAR-100 code (``clovaai/overhaul-distillation``, ``loss_CE + loss_distill / batch_size
    / 1000``, stage ``i`` of ``n`` divided by ``2^(n-i-1)``), also mdistiller's OFD (``FEAT_WEIGHT 0.001``,
    ``CE_WEIGHT 1``, 1×1 connector, ``preact_feats[1:]``). The margins are computed once, when the connectors are
    built, and saved with them.

    Pre-ReLU features come from ``stage_names(preact=True)`` for registered models; for timm models and registered
    models without that list, from the input of each stage's last ``nn.ReLU`` (copied before an in-place ReLU
    overwrites it). The margin's BatchNorm is found from the layer
    (:func:`preact_batchnorm`); name layers and BatchNorms explicitly for other models.

    The teacher runs in eval mode, as every teacher here: its pre-ReLU features are normalised with its running
    BatchNorm statistics. The official code and mdistiller run the teacher in train mode, normalising with each
    batch's statistics (whose channels then have exactly mean β and std |γ|, the margin's assumption) and updating
    the running statistics as they go.

    Args:
        ofd_weight: weight of the summed stage losses.
        ce_weight: weight of the cross-entropy with the labels.
        student_layers: module names of the student's pre-ReLU features (``name:input`` for an activation's input),
            instead of its pre-activation stages.
        teacher_layers: likewise for the teacher, one per student layer.
        teacher_bns: names of the teacher BatchNorms whose ``γ``, ``β`` give each teacher layer's margins, instead
            of the ones found from ``teacher_layers``.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``. The connectors are built from the feature shapes of
            one dry forward pass on it: here when given, else in ``setup`` from the first sample of the data, which
            is then stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds them before their
            weights load.
    """

    def __init__(self, *args, ofd_weight: float = 1e-3, ce_weight: float = 1.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 teacher_bns: list[str] | None = None, input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        default_student = [] if student_layers is not None else preactivation_layers(self.student, "student", "OFD", " and teacher_bns=[...]")
        default_teacher = [] if teacher_layers is not None else preactivation_layers(self.teacher, "teacher", "OFD", " and teacher_bns=[...]")
        self.use_features(*paired_stages(student_layers, teacher_layers, default_student, default_teacher, "OFD"))
        self.teacher_bns = self._margin_batchnorms(teacher_bns)
        self.connectors: nn.ModuleList | None = None
        self.init_projection(input_shape)

    def _margin_batchnorms(self, names: list[str] | None) -> list[str]:
        if names is None:
            found = [preact_batchnorm(self.teacher, layer) for layer in self.teacher_layers]
            missing = [layer for layer, name in zip(self.teacher_layers, found) if name is None]
            if missing:
                raise ValueError(f"OFD takes each teacher layer's margin from the BatchNorm before its ReLU, but found "
                                 f"none for {', '.join(missing)} in the teacher ({type(self.teacher).__name__}): "
                                 "pass teacher_bns=[...] with one BatchNorm module name per teacher layer")
            return found
        names = check_layers(self.teacher, names, "teacher")
        if len(names) != len(self.teacher_layers):
            raise ValueError(f"OFD needs one teacher BatchNorm per teacher layer, but got {len(names)} teacher_bns for "
                             f"{len(self.teacher_layers)} teacher layers ({', '.join(self.teacher_layers)})")
        for name in names:
            if not isinstance(self.teacher.get_submodule(name), nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"teacher_bns must name BatchNorm modules, but {name!r} of the teacher is a "
                                 f"{type(self.teacher.get_submodule(name)).__name__}: name the BatchNorm whose output "
                                 "feeds the teacher layer's ReLU")
        return names

    def build_projections(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """One connector per stage from the feature shapes, and the teacher margins as buffers ``margin_<i>``."""
        connectors = []
        for i, (student_shape, teacher_shape, bn_name) in enumerate(zip(student_shapes, teacher_shapes,
                                                                        self.teacher_bns)):
            bn = self.teacher.get_submodule(bn_name)
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

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        if self.connectors is None:
            raise RuntimeError("OFD's connectors are not built: pass input_shape or train through a Trainer (setup "
                               "builds them from the data)")
        pairs = list(zip(student_out.features.values(), teacher_out.features.values(), self.connectors, self.margins))
        total = 0.0
        for i, (student_feat, teacher_feat, connector, margin) in enumerate(pairs):
            student_feat = connector(student_feat)
            if teacher_feat.dim() == 4 and teacher_feat.shape[-2:] != student_feat.shape[-2:]:
                teacher_feat = F.adaptive_avg_pool2d(teacher_feat, student_feat.shape[-2:])
            total = total + ofd_loss(student_feat, teacher_feat, margin) / 2 ** (len(pairs) - i - 1)
        return {"ofd": self.hparams.ofd_weight * total}
