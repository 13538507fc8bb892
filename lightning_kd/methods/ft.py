from __future__ import annotations

from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.terms.staged import FTTerm


class FT(InitPhaseDistillation):
    """Factor transfer (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018).

    Init phase (``init_epochs``): a paraphraser (convolutional autoencoder, factor of ``rate · C_t`` channels) is
    trained alone to reconstruct the teacher's last-stage feature, ``mean (dec(enc(f_t)) − f_t)²``; the student is
    not run. Then the paraphraser is frozen and ``loss = ce_weight · CE + ft_weight · mean_{b,j} |Q(tr(f_s)) −
    Q(enc(f_t))|^p`` with ``tr`` the trainable translator on the student's last-stage feature and ``Q`` the
    normalised factor map of :func:`~lightning_kd.losses.feature.ft_loss` (batch and position mean). Defaults:
    the CRD CIFAR-100 setting (RepDistiller ``train_student.py --distill factor -r 1 -a 0 -b 200``: 30 init epochs at
    lr 0.01 for the CIFAR ResNet/WRN students, ``k = 0.5``, ``p1 = 2``, ``p2 = 1``, paraphraser without and
    translator with BatchNorm); the schedule and phase switch are those of
    :class:`~lightning_kd.methods.init_phase.InitPhaseDistillation`.

    Args:
        ft_weight: weight of the factor loss.
        ce_weight: weight of the cross-entropy with the labels (after the init phase).
        init_epochs: epochs of paraphraser training (the reference's ``--init_epochs 30``).
        init_lr: learning rate of the paraphraser's SGD (the reference uses 0.01 for CIFAR ResNet/WRN students and
            the student's rate, e.g. 0.05 for VGG, otherwise).
        rate: factor channels as a fraction of the teacher's channels.
        p: exponent of the factor differences (1: L1).
        factor_exponent: power of the factors before their channel mean (RepDistiller's ``p1``), or ``None`` to
            compare whole normalised factors as the paper's code.
        student_layer: module name of the student's feature, instead of its last stage.
        teacher_layer: module name of the teacher's feature, instead of its last stage.

    The losses are the term :class:`~lightning_kd.terms.staged.FTTerm` (``terms.ft``). Paraphraser and translator
    are built from the feature shapes of one dry forward pass on ``input_shape`` (see
    :class:`~lightning_kd.methods.DistillationModule`).
    """

    def __init__(self, *args, ft_weight: float = 200.0, ce_weight: float = 1.0, init_epochs: int = 30,
                 init_lr: float = 0.01, rate: float = 0.5, p: float = 1.0, factor_exponent: float | None = 2.0,
                 student_layer: str | None = None, teacher_layer: str | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        self.add_term("ft", FTTerm(rate, p, factor_exponent, student_layer, teacher_layer, weight=ft_weight))

    @property
    def paraphraser(self):
        """The teacher's paraphraser (``None`` until built)."""
        return self.terms["ft"].paraphraser

    @property
    def translator(self):
        """The student's translator (``None`` until built)."""
        return self.terms["ft"].translator
