"""Teacher–student fidelity metrics as torchmetrics ``Metric``s (accumulated on device, synced under DDP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


class Agreement(Metric):
    """Top-1 agreement: the fraction of samples on which student and teacher predict the same class
    (Stanton et al., "Does Knowledge Distillation Really Work?", NeurIPS 2021).

    >>> metric = Agreement()
    >>> metric.update(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    >>> metric.compute()
    tensor(0.5000)
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("agree", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        self.agree += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
        self.total += student_logits.shape[0]

    def compute(self) -> Tensor:
        return self.agree / self.total.clamp(min=1)


class TeacherStudentKL(Metric):
    """Mean over samples of KL(teacher ‖ student) between the softmax outputs at temperature 1, in nats.

    >>> metric = TeacherStudentKL()
    >>> metric.update(torch.zeros(3, 4), torch.zeros(3, 4))
    >>> metric.compute()
    tensor(0.)
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("kl_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        teacher_log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
        student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
        self.kl_sum += kl.sum()
        self.total += student_logits.shape[0]

    def compute(self) -> Tensor:
        return self.kl_sum / self.total.clamp(min=1)
