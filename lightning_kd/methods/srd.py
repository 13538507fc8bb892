from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import KDTerm, SRDTerm


class SRD(DistillationModule):
    """Softmax regression representation learning (Yang et al., "Knowledge Distillation via Softmax Regression
    Representation Learning", ICLR 2021).

    The student's pooled embedding goes through a connector ``r`` (1×1 convolution, BatchNorm, ReLU) into the
    teacher's embedding space and then through the teacher's frozen classifier ``W_t``:
    ``loss = ce_weight · CE + fm_weight · mean (r(z_s) − z_t)² + sr_weight · mean (W_t r(z_s) − t)²
    + kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))``, the two MSE means over batch and dimensions
    (feature matching and softmax regression, as ``statm_loss`` and ``F.mse_loss`` in the official
    ``jingyang2017/KD_SRRL``), the KD term on the student's own logits (:func:`~lightning_kd.losses.kd_loss`,
    batch mean); gradients reach the student through ``W_t`` but ``W_t`` stays frozen. Defaults: the CIFAR-100
    setting of the SimKD benchmark (Chen et al., CVPR 2022, ``scripts/run_distill.sh``: ``--distill srrl -c 1
    -d 1 -b 1``, KD temperature 4), which runs this method on the CRD pairs with the official connector and losses.

    Args:
        fm_weight: weight of the feature-matching MSE.
        sr_weight: weight of the softmax-regression MSE between the teacher's logits and its classifier applied
            to the connected student embedding.
        kd_weight: weight of the KD term on the student's logits (0 disables it).
        temperature: temperature of the KD term.
        ce_weight: weight of the cross-entropy with the labels.
        student_layer: module name of the student's embedding (default: from the model's feature interface).
        teacher_layer: module name of the teacher's embedding, the input of ``teacher_classifier``.
        teacher_classifier: module name of the teacher's final linear layer (default: from the model's feature
            interface).

    The connector is built from the embedding sizes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, fm_weight: float = 1.0, sr_weight: float = 1.0, kd_weight: float = 1.0,
                 temperature: float = 4.0, ce_weight: float = 1.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, teacher_classifier: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("srd", SRDTerm(fm_weight, sr_weight, student_layer, teacher_layer, teacher_classifier))
        if kd_weight:
            self.add_term("kd", KDTerm(temperature, weight=kd_weight))

    @property
    def projector(self):
        """The connector from the student's embedding to the teacher's (``None`` until built)."""
        return self.terms["srd"].projector

    @property
    def teacher_classifier_name(self) -> str:
        """Module name of the teacher's classifier the softmax regression goes through."""
        return self.terms["srd"].teacher_classifier_name
