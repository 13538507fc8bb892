from __future__ import annotations

from collections.abc import Sequence

import torch

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.features import check_layers, classifier_name, embedding_name
from lightning_kd.losses import fitnet_loss, kd_loss
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn import ConvBN


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
        input_shape: shape of one input, e.g. ``(3, 32, 32)``. The connector is built from the embedding sizes of
            one dry forward pass on this shape: here when given, else in ``setup`` from the first sample of the
            data, which is then stored in the hyper-parameters so that ``load_from_checkpoint`` rebuilds the
            connector before its weights load.
    """

    def __init__(self, *args, fm_weight: float = 1.0, sr_weight: float = 1.0, kd_weight: float = 1.0,
                 temperature: float = 4.0, ce_weight: float = 1.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, teacher_classifier: str | None = None,
                 input_shape: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.use_features(student_layer or embedding_name(self.student),
                          teacher_layer or embedding_name(self.teacher))
        self.teacher_classifier_name, = check_layers(self.teacher, teacher_classifier or classifier_name(self.teacher),
                                                     "teacher")
        self.projector = None
        self.init_projection(input_shape)

    def build_projection(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        if len(student_shape) != 2 or len(teacher_shape) != 2:
            raise ValueError(f"SRD connects (N, C) embeddings, got student {tuple(student_shape)} and teacher "
                             f"{tuple(teacher_shape)}: hook the pooled embeddings (the teacher's is its classifier's "
                             "input)")
        self.projector = ConvBN(student_shape[1], teacher_shape[1], relu=True)

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        hp = self.hparams
        student_emb, = student_out.features.values()
        teacher_emb, = teacher_out.features.values()
        connected = self.projector(student_emb)
        regressed_logits = self.teacher.get_submodule(self.teacher_classifier_name)(connected)
        losses = {"fm": hp.fm_weight * fitnet_loss(connected, teacher_emb),
                  "sr": hp.sr_weight * F.mse_loss(regressed_logits.float(), teacher_out.logits.float())}
        if hp.kd_weight:
            losses["kd"] = hp.kd_weight * kd_loss(student_out.logits, teacher_out.logits, hp.temperature)
        return losses
