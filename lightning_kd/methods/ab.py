from __future__ import annotations

from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.terms.staged import ABTerm


class AB(InitPhaseDistillation):
    """Activation-boundary distillation (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons", AAAI 2019).

    Init phase (``init_epochs``): student and connectors are trained on ``ab_weight · Σ_l 2^(l−L+1) ·
    ab_loss(c_l(s_l), t_l)`` alone, ``s_l``/``t_l`` the pre-activations (before the final ReLU) of the ``L`` stages
    after the stem, ``c_l`` the connector (identity when channels and size agree, else 1×1 convolution and
    BatchNorm), and :func:`~lightning_kd.losses.feature.ab_loss` the margin hinge loss (sum over elements,
    batch mean). Then the connectors are frozen and ``loss = ce_weight · CE`` alone, as in the reference (its
    ``loss_kd = 0`` for AB; the CRD script's ``-b 1`` has no effect). Defaults: the CRD CIFAR-100 setting
    (RepDistiller ``--distill abound -r 1 -a 0 -b 1``, 30 init epochs at the student's rate 0.05, margin 1, stage
    weights ``2^(l−L+1)``, scale ``3/1000``); the schedule and phase switch are those of
    :class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`.

    Args:
        ab_weight: weight of the stage-weighted AB loss in the init phase (the reference's ``3/1000``).
        margin: margin ``μ`` of the hinge loss.
        ce_weight: weight of the cross-entropy with the labels (after the init phase).
        init_epochs: epochs of AB-only training.
        init_lr: learning rate of the init phase's SGD.
        student_layers: module names of the student's pre-activations, instead of ``stage_names(preact=True)``
            after the stem (models without that interface: the input of each stage's last ReLU).
        teacher_layers: module names of the teacher's, as many as the student's.

    The loss is the term :class:`~lightning_kd.terms.staged.ABTerm` (``terms.ab``). The connectors are built from the
    feature shapes of one dry forward pass on ``input_shape`` (see :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, ab_weight: float = 3e-3, margin: float = 1.0, ce_weight: float = 1.0,
                 init_epochs: int = 30, init_lr: float = 0.05, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        self.add_term("ab", ABTerm(margin, student_layers, teacher_layers, weight=ab_weight))

    @property
    def connectors(self):
        """The connectors, one per layer pair (``None`` until built)."""
        return self.terms["ab"].connectors
