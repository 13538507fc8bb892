from __future__ import annotations

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import RLDTerm


class RLD(DistillationModule):
    """Refined logit distillation (Sun et al., "Knowledge Distillation with Refined Logits", arXiv:2408.07703, 2024).

    ``loss = ce_weight · CE + ramp · (α · SCD + β · MCD)``: sample confidence distillation matches the student's
    binary (label vs rest) distribution to the teacher's top-1 confidence, and masked correlation distillation
    matches the distributions over the classes the teacher ranks below the label, so a wrong teacher prediction
    is never taught (see :func:`lightning_kd.losses.logit_refined.rld_loss`). Each KL is summed over classes,
    averaged over the batch and × T². ``ramp = min(epoch / warmup_epochs, 1)`` with epochs counted from 1, as in
    the official code. Defaults α=1, β=8, T=4 for both terms, CE 1, 20 warm-up epochs are the official CIFAR-100
    setting (``zju-SWJ/RLD``: its configuration defaults and the README's ``--same-t`` command).

    Args:
        alpha: weight of sample confidence distillation (SCD).
        beta: weight of masked correlation distillation (MCD).
        temperature: temperature of MCD, and of SCD unless ``confidence_temperature`` is given.
        confidence_temperature: a separate temperature for SCD (the official ``ALPHA_T``); ``None``: ``temperature``.
        warmup_epochs: epochs of the linear ramp of the RLD term (0: none).
        ce_weight: weight of the cross-entropy with the labels.
    """

    def __init__(self, *args, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 confidence_temperature: float | None = None, warmup_epochs: int = 20, ce_weight: float = 1.0,
                 **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        self.add_term("rld", RLDTerm(alpha, beta, temperature, confidence_temperature, warmup_epochs=warmup_epochs))
