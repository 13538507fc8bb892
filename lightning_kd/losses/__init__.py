"""Distillation losses as pure functions (torchmetrics-style functional API).

Logit-based losses live in :mod:`lightning_kd.losses.logit`; further loss
families are added as sibling modules and re-exported here.
"""

from lightning_kd.losses.logit import (
    cosine_lambda,
    ctkd_temperature,
    dist_loss,
    dkd_loss,
    gradient_reversal,
    kd_loss,
    normkd_loss,
    standardize_logits,
)

__all__ = [
    "cosine_lambda",
    "ctkd_temperature",
    "dist_loss",
    "dkd_loss",
    "gradient_reversal",
    "kd_loss",
    "normkd_loss",
    "standardize_logits",
]
