from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import KDTerm, TfKDVirtualTerm


class TfKDSelf(DistillationModule):
    """Teacher-free KD by self-training, Tf-KD_self (Yuan et al., "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", CVPR 2020).

    The teacher is the student's own trained copy: build it as the same model and load the weights of a first,
    ordinary run (e.g. ``teacher="resnet18", teacher_weights=<student.pt from export_student>``); the method is
    then KD with the paper's objective ``(1 - α) · CE + α · m · T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    Reduction as in the official code: the KL is averaged over all B × C entries (``nn.KLDivLoss()``'s
    element-wise mean), i.e. the batch-mean KL of :func:`lightning_kd.losses.kd_loss` divided by ``num_classes``,
    so that the official α, T and multiplier ``m`` apply unchanged. Defaults α=0.95, T=6, m=50 are the official
    CIFAR-100 ResNet-18 setting (``experiments/kd_experiments/resnet18_distill/resnet18_self_teacher``); others
    vary per network (MobileNetV2 and ShuffleNetV2: α=0.95, T=20, m=1; ResNeXt-29: α=0.9, T=20, m=100): set them
    in the config.

    Args:
        alpha: the paper's α: the KL weight, with ``1 - α`` on the cross-entropy.
        temperature: softening temperature T of both distributions.
        multiplier: the official extra factor ``m`` of the KL term.
        ce_weight: weight of the cross-entropy; ``None``: ``1 - alpha``.
    """

    def __init__(self, *args, alpha: float = 0.95, temperature: float = 6.0, multiplier: float = 50.0,
                 ce_weight: float | None = None, **kwargs):
        ce_weight = 1.0 - alpha if ce_weight is None else ce_weight  # resolved before the base records hparams
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("kd", KDTerm(temperature, weight=self.kd_weight))

    @property
    def kd_weight(self) -> float:
        """Weight of the batch-mean KD loss: ``α · m / num_classes``."""
        return self.hparams.alpha * self.hparams.multiplier / self.num_classes


class TfKDVirtual(DistillationModule):
    """Teacher-free KD with a hand-designed ("virtual") teacher, Tf-KD_reg (Yuan et al., "Revisiting Knowledge
    Distillation via Label Smoothing Regularization", CVPR 2020). Needs no teacher model.

    The teacher puts probability ``a`` on the label and ``(1 - a) / (K - 1)`` on every other class; the objective
    is ``(1 - α) · CE + α · m · KL(softmax(p_d / T) ‖ softmax(s))``, with the teacher softened and the student taken
    at temperature 1 as in the official code (see :func:`lightning_kd.losses.logit_refined.virtual_teacher_loss`).

    Reduction as in the official code: the KL is averaged over all B × C entries, i.e. the batch-mean KL divided
    by ``num_classes``. Defaults a=0.99 (the official code; the paper asks for ``a ≥ 0.9``), α=0.1, T=20, m=100
    are the official CIFAR-100 ResNet-18 setting (``experiments/base_experiments/base_resnet18`` with
    ``--regularization``); others vary per network (MobileNetV2: α=0.95, T=40, m=1; ShuffleNetV2: α=0.95, T=10,
    m=1): set them in the config. A teacher, if given, is only measured against (agreement, KL), as with
    :class:`~lightning_kd.methods.supervised.Supervised`.

    Args:
        alpha: the paper's α: the KL weight, with ``1 - α`` on the cross-entropy.
        temperature: softening temperature T of the hand-designed teacher.
        multiplier: the official extra factor ``m`` of the KL term.
        correct_prob: probability ``a`` of the labelled class in the hand-designed teacher.
        ce_weight: weight of the cross-entropy; ``None``: ``1 - alpha``.
    """

    requires_teacher = False

    def __init__(self, *args, alpha: float = 0.1, temperature: float = 20.0, multiplier: float = 100.0,
                 correct_prob: float = 0.99, ce_weight: float | None = None, **kwargs):
        ce_weight = 1.0 - alpha if ce_weight is None else ce_weight  # resolved before the base records hparams
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("virtual", TfKDVirtualTerm(correct_prob, temperature, weight=self.kd_weight))

    @property
    def kd_weight(self) -> float:
        """Weight of the batch-mean virtual-teacher KL: ``α · m / num_classes``."""
        return self.hparams.alpha * self.hparams.multiplier / self.num_classes
