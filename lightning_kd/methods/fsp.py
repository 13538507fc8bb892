from __future__ import annotations

from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.terms.staged import FSPTerm


class FSP(InitPhaseDistillation):
    """Flow-of-solution-procedure distillation (Yim et al., "A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning", CVPR 2017).

    Init phase (``init_epochs``): the student is trained on ``fsp_weight · Σ_l mean (G_s^l − G_t^l)²`` alone, ``G^l``
    the FSP matrix of stages ``l`` and ``l+1`` (:func:`~lightning_kd.losses.feature.fsp_matrix`: mean over
    positions of channel products, the larger map pooled to the smaller) over the consecutive pairs of all stage
    outputs, stem included (RepDistiller's ``feat[:-1]``), and
    :func:`~lightning_kd.losses.feature.fsp_loss` the batch and matrix mean. Then ``loss = ce_weight · CE``
    alone, as in the paper (stage 2: the main task) and the reference (its ``loss_kd = 0`` for FSP; the CRD script's
    ``-b 50`` has no effect). Defaults: the CRD CIFAR-100 setting (RepDistiller ``--distill fsp -r 1 -a 0 -b 50``,
    30 init epochs at the student's rate 0.05); the schedule and phase switch are those of
    :class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`.

    FSP matrices compare only when student and teacher stages have equal channel counts (the reference refuses
    other pairs). Where they differ, a trainable 1×1 convolution and BatchNorm maps the student's stage to the
    teacher's channels first (trained in the init phase, then frozen); the CRD pairs need none.

    Args:
        fsp_weight: weight of the summed FSP losses in the init phase.
        ce_weight: weight of the cross-entropy with the labels (after the init phase).
        init_epochs: epochs of FSP-only training.
        init_lr: learning rate of the init phase's SGD.
        student_layers: module names of the student's features, instead of all its stages (stem first).
        teacher_layers: module names of the teacher's, as many as the student's (at least two).

    The loss is the term :class:`~lightning_kd.terms.staged.FSPTerm` (``terms.fsp``). The connectors are chosen from
    the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, fsp_weight: float = 1.0, ce_weight: float = 1.0, init_epochs: int = 30,
                 init_lr: float = 0.05, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        self.add_term("fsp", FSPTerm(student_layers, teacher_layers, weight=fsp_weight))

    @property
    def connectors(self):
        """The channel connectors, one per layer (``None`` until built)."""
        return self.terms["fsp"].connectors
