from __future__ import annotations

from lightning_kd.features import paired_stages  # noqa: F401  (imported from here before)
from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import OFDTerm
from lightning_kd.terms.fusion import preact_batchnorm  # noqa: F401  (imported from here before)


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
    (:func:`~lightning_kd.terms.fusion.preact_batchnorm`); name layers and BatchNorms explicitly for other models.

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

    The connectors are built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, ofd_weight: float = 1e-3, ce_weight: float = 1.0,
                 student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 teacher_bns: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("ofd", OFDTerm(student_layers, teacher_layers, teacher_bns, weight=ofd_weight))

    @property
    def connectors(self):
        """The per-stage connectors (``None`` until built)."""
        return self.terms["ofd"].connectors

    @property
    def teacher_bns(self) -> list[str]:
        """Names of the teacher BatchNorms the margins come from, one per teacher layer."""
        return self.terms["ofd"].teacher_bns

    @property
    def margins(self):
        """The teacher margins of the stages, shallow to deep."""
        return self.terms["ofd"].margins
