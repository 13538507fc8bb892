from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.methods.base import DistillationModule


class Supervised(DistillationModule):
    """The student alone with cross-entropy: the baseline every method is compared with, and how teachers are
    trained. A teacher, if given, is only measured against (agreement, KL), never learnt from.

    Args:
        label_smoothing: smoothing of the one-hot targets (Szegedy et al., CVPR 2016); 0 is plain
            cross-entropy. This gives the "label smoothing" row of a KD-vs-smoothing comparison.
    """

    requires_teacher = False

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)

    def cross_entropy(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(student_logits.float(), target, label_smoothing=self.hparams.label_smoothing)
