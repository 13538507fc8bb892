from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.features import stage_names
from lightning_kd.losses.feature_extra import ft_loss
from lightning_kd.methods.base import Batch, ModelOutput
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.nn.adapters import Paraphraser, Translator, factor_channels


class FT(InitPhaseDistillation):
    """Factor transfer (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018).

    Init phase (``init_epochs``): a paraphraser (convolutional autoencoder, factor of ``rate · C_t`` channels) is
    trained alone to reconstruct the teacher's last-stage feature, ``mean (dec(enc(f_t)) − f_t)²``; the student is
    not run. Then the paraphraser is frozen and ``loss = ce_weight · CE + ft_weight · mean_{b,j} |Q(tr(f_s)) −
    Q(enc(f_t))|^p`` with ``tr`` the trainable translator on the student's last-stage feature and ``Q`` the
    normalised factor map of :func:`~lightning_kd.losses.feature_extra.ft_loss` (batch and position mean). Defaults:
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
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; paraphraser and translator are built from the
            feature shapes of one dry forward pass on it: here when given, else in ``setup`` from the data (then
            stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds them).
    """

    def __init__(self, *args, ft_weight: float = 200.0, ce_weight: float = 1.0, init_epochs: int = 30,
                 init_lr: float = 0.01, rate: float = 0.5, p: float = 1.0, factor_exponent: float | None = 2.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, init_epochs=init_epochs, init_lr=init_lr, **kwargs)
        self.use_features(student_layer or stage_names(self.student)[-1],
                          teacher_layer or stage_names(self.teacher)[-1])
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None
        self.init_projection(input_shape)

    def build_projection(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(f"FT paraphrases (N, C, H, W) feature maps, got student {tuple(student_shape)} and "
                             f"teacher {tuple(teacher_shape)}: hook convolutional layers (student_layer=, "
                             "teacher_layer=)")
        rate = self.hparams.rate
        self.paraphraser = Paraphraser(teacher_shape[1], rate)
        self.translator = Translator(student_shape[1], factor_channels(teacher_shape[1], rate))

    def init_modules(self) -> list[nn.Module]:
        return [self.paraphraser]

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.paraphraser]

    def init_losses(self, batch: Batch) -> dict[str, Tensor]:
        teacher_feat, = self.forward_teacher(batch).features.values()
        _, reconstruction = self.paraphraser(teacher_feat)
        return {"reconstruction": F.mse_loss(reconstruction.float(), teacher_feat.float())}

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        student_feat, = student_out.features.values()
        teacher_feat, = teacher_out.features.values()
        with torch.no_grad():
            teacher_factor = self.paraphraser.encode(teacher_feat)
        student_factor = self.translator(student_feat)
        return {"ft": hp.ft_weight * ft_loss(student_factor, teacher_factor, hp.p, hp.factor_exponent)}
