"""Terms with an initialisation phase: FSP, AB and FT first train some parts (the student's early layers, connectors,
a paraphraser) on a loss of their own, then distil with their main-phase loss.

A :class:`StagedTerm` gives both: :meth:`~StagedTerm.init_losses` for the init phase and the usual
:meth:`~DistillationTerm.losses` for the main phase, and names the parts trained in the init phase and fixed after
it. The host runs the two phases (:class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`, the base of
:class:`~lightning_kd.methods.FSP`, :class:`~lightning_kd.methods.AB` and :class:`~lightning_kd.methods.FT`); a host
without an init phase refuses these terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.features import preactivation_layers, stage_names, stage_pairs
from lightning_kd.losses.feature import ab_loss, fsp_loss, fsp_matrix, ft_loss
from lightning_kd.nn.adapters import Paraphraser, Translator, boundary_connector, channel_connector, factor_channels
from lightning_kd.terms.base import DistillationTerm


class StagedTerm(DistillationTerm):
    """A term trained in two phases: :meth:`init_losses` while the host's init phase runs, :meth:`losses` after it.

    The init phase optimizes :meth:`init_parts` (and the student when :attr:`init_trains_student`); afterwards
    :meth:`frozen_parts` are fixed. :meth:`init_forward` weighs the init losses by :attr:`init_weight` (no warm-up
    ramp: the init phase has its own epochs).
    """

    #: whether the init phase runs and trains the student (else only the teacher is run)
    init_trains_student: bool = True

    def bind(self, host) -> None:
        if not hasattr(host, "init_phase_done"):
            raise ValueError(f"{type(self).__name__} trains its parts in an initialisation phase, which "
                             f"{type(host).__name__} does not run: use the method that runs it (e.g. "
                             "lightning_kd.methods.FSP, AB or FT) or a subclass of "
                             "lightning_kd.methods.init_phase.InitPhaseDistillation")
        super().bind(host)

    @property
    def init_weight(self) -> float:
        """The factor of the init-phase losses: ``weight`` by default."""
        return self.weight

    def init_losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        """The init phase's unweighted losses by name (``student_out`` is ``None`` unless
        :attr:`init_trains_student`)."""
        raise NotImplementedError(f"{type(self).__name__} does not define init_losses")

    def init_forward(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        """:meth:`init_losses`, each × :attr:`init_weight`."""
        if not self.built:
            raise RuntimeError(f"{type(self).__name__}'s trainable parts are not built: pass input_shape=(C, H, W) to "
                               "the module or train through a Trainer (setup builds them from the data)")
        return {name: self.init_weight * value
                for name, value in self.init_losses(batch, student_out, teacher_out).items()}

    def init_parts(self) -> list[nn.Module]:
        """The term's modules optimized in the init phase."""
        return []

    def frozen_parts(self) -> list[nn.Module]:
        """The term's modules fixed once the init phase is over."""
        return []


class FSPTerm(StagedTerm):
    """Flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017): in the init phase
    ``{"fsp": Σ_l mean (G_s^l − G_t^l)²}``, ``G^l`` the FSP matrix of layers ``l`` and ``l+1``
    (:func:`~lightning_kd.losses.feature.fsp_matrix`) over consecutive pairs of the hooked layers, the mean over
    batch and matrix entries (:func:`~lightning_kd.losses.feature.fsp_loss`); no loss afterwards (the paper's
    second stage is the main task alone). ``weight`` weighs the init loss.

    Where a student layer's channels differ from the teacher's, a trainable ``connectors`` entry (1×1 convolution and
    BatchNorm) maps it first; it is trained with the student in the init phase and then fixed.

    Args:
        student_layers: module names of the student's features, instead of all its stages (stem first).
        teacher_layers: module names of the teacher's, as many as the student's (at least two).
        weight: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.given_layers = (student_layers, teacher_layers)
        self.connectors: nn.ModuleList | None = None

    def layers(self, student, teacher):
        student_layers, teacher_layers = self.given_layers
        pairs = stage_pairs(student, teacher, student_layers or stage_names(student),
                            teacher_layers or stage_names(teacher), "FSP")
        if len(pairs[0]) < 2:
            raise ValueError(f"FSP relates consecutive layers, but got one pair ({pairs[0][0]}, {pairs[1][0]}): pass "
                             "at least two student_layers and teacher_layers")
        return pairs

    def build(self, student_shapes, teacher_shapes) -> None:
        """A channel connector per layer where the counts differ (identity elsewhere)."""
        for layer, shape in zip([*self.student_layers, *self.teacher_layers], [*student_shapes, *teacher_shapes]):
            if len(shape) != 4:
                raise ValueError(f"FSP relates (N, C, H, W) feature maps, but layer {layer!r} gives shape "
                                 f"{tuple(shape)}: pass student_layers and teacher_layers of convolutional stages")
        self.connectors = nn.ModuleList(channel_connector(s[1], t[1]) for s, t in zip(student_shapes, teacher_shapes))

    def init_losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student = [connector(f) for connector, f in zip(self.connectors, self.student_features(student_out))]
        teacher = self.teacher_features(teacher_out)
        return {"fsp": sum(fsp_loss(fsp_matrix(s_bottom, s_top), fsp_matrix(t_bottom, t_top))
                           for s_bottom, s_top, t_bottom, t_top in zip(student, student[1:], teacher, teacher[1:]))}

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        return {}

    def init_parts(self) -> list[nn.Module]:
        return [self.connectors]

    def frozen_parts(self) -> list[nn.Module]:
        return [self.connectors]


class ABTerm(StagedTerm):
    """Activation boundaries (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019): in the init phase ``{"ab": Σ_l 2^(l−L+1) · ab_loss(c_l(s_l), t_l)}`` over the ``L``
    paired pre-activations (before the final ReLU of each stage after the stem), ``c_l`` a trainable connector
    (identity when channels and size agree, else 1×1 convolution and BatchNorm) and
    :func:`~lightning_kd.losses.feature.ab_loss` the margin hinge loss (sum over elements, batch mean); no loss
    afterwards, as in the reference (RepDistiller's ``loss_kd = 0`` for AB). The connectors are trained with the
    student in the init phase, then fixed. ``weight`` weighs the init loss (the reference's ``3/1000``).

    Args:
        margin: margin ``μ`` of the hinge loss.
        student_layers: module names of the student's pre-activations, instead of its stages' (models without a
            pre-activation list: the input of each stage's last ReLU).
        teacher_layers: module names of the teacher's, as many as the student's.
        weight: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, margin: float = 1.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.margin = margin
        self.given_layers = (student_layers, teacher_layers)
        self.connectors: nn.ModuleList | None = None

    def layers(self, student, teacher):
        student_layers, teacher_layers = self.given_layers
        return stage_pairs(student, teacher, student_layers or preactivation_layers(student, "student", "AB"),
                           teacher_layers or preactivation_layers(teacher, "teacher", "AB"), "AB")

    def build(self, student_shapes, teacher_shapes) -> None:
        """One connector per layer pair."""
        self.connectors = nn.ModuleList(boundary_connector(s, t) for s, t in zip(student_shapes, teacher_shapes))

    def init_losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        pairs = zip(self.connectors, self.student_features(student_out), self.teacher_features(teacher_out))
        count = len(self.connectors)
        return {"ab": sum(2.0 ** (index - count + 1) * ab_loss(connector(s), t, self.margin)
                          for index, (connector, s, t) in enumerate(pairs))}

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        return {}

    def init_parts(self) -> list[nn.Module]:
        return [self.connectors]

    def frozen_parts(self) -> list[nn.Module]:
        return [self.connectors]


class FTTerm(StagedTerm):
    """Factor transfer (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018): ``{"ft": mean_{b,j} |Q(tr(f_s)) − Q(enc(f_t))|^p}``, ``tr`` the trainable ``translator`` of the
    student's feature, ``enc`` the ``paraphraser``'s encoder of the teacher's (no gradient) and ``Q`` the normalised
    factor map of :func:`~lightning_kd.losses.feature.ft_loss` (batch and position mean).

    Init phase: the paraphraser (a convolutional autoencoder whose factor has ``rate · C_t`` channels) alone learns to
    reconstruct the teacher's feature, ``{"reconstruction": mean (dec(enc(f_t)) − f_t)²}``, unweighted (``weight``
    weighs ``ft`` only); the student is not run. Then the paraphraser is fixed.

    Args:
        rate: factor channels as a fraction of the teacher's channels.
        p: exponent of the factor differences (1: L1).
        factor_exponent: power of the factors before their channel mean (RepDistiller's ``p1``), or ``None`` to
            compare whole normalised factors.
        student_layer: module name of the student's feature, instead of its last stage.
        teacher_layer: module name of the teacher's feature, instead of its last stage.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True
    init_trains_student = False

    def __init__(self, rate: float = 0.5, p: float = 1.0, factor_exponent: float | None = 2.0,
                 student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.p, self.factor_exponent = rate, p, factor_exponent
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    @property
    def init_weight(self) -> float:
        return 1.0

    def layers(self, student, teacher):
        return [self.student_layer or stage_names(student)[-1]], [self.teacher_layer or stage_names(teacher)[-1]]

    def build(self, student_shapes, teacher_shapes) -> None:
        student_shape, teacher_shape = student_shapes[0], teacher_shapes[0]
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(f"FT paraphrases (N, C, H, W) feature maps, got student {tuple(student_shape)} and "
                             f"teacher {tuple(teacher_shape)}: hook convolutional layers (student_layer=, "
                             "teacher_layer=)")
        self.paraphraser = Paraphraser(teacher_shape[1], self.rate)
        self.translator = Translator(student_shape[1], factor_channels(teacher_shape[1], self.rate))

    def init_losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        teacher_feat, = self.teacher_features(teacher_out)
        _, reconstruction = self.paraphraser(teacher_feat)
        return {"reconstruction": F.mse_loss(reconstruction.float(), teacher_feat.float())}

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        student_feat, = self.student_features(student_out)
        teacher_feat, = self.teacher_features(teacher_out)
        with torch.no_grad():
            teacher_factor = self.paraphraser.encode(teacher_feat)
        return {"ft": ft_loss(self.translator(student_feat), teacher_factor, self.p, self.factor_exponent)}

    def init_parts(self) -> list[nn.Module]:
        return [self.paraphraser]

    def frozen_parts(self) -> list[nn.Module]:
        return [self.paraphraser]
