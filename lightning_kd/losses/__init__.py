"""Distillation losses as pure functions (torchmetrics-style functional API).

Logit-based losses live in :mod:`lightning_kd.losses.logit`, feature-map losses
in :mod:`lightning_kd.losses.feature` and relation/embedding losses in
:mod:`lightning_kd.losses.relation`; all are re-exported here.
"""

from lightning_kd.losses.contrastive import contrast_scores, crd_loss, nce_loss, nce_normalizer
from lightning_kd.losses.datafree import batch_moments, bn_statistics_loss, logit_l1_discrepancy
from lightning_kd.losses.feature import at_loss, fitnet_loss, logsum_distance, nst_loss
from lightning_kd.losses.feature_extra import ab_loss, fsp_loss, fsp_matrix, ft_loss, pool_to_common_size, vid_loss
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin, ofd_margin_from_bn
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
from lightning_kd.losses.logit_extra import mlkd_loss, rld_loss, virtual_teacher_loss, virtual_teacher_probs
from lightning_kd.losses.online import dml_loss, mean_logit_ensemble, min_logit_ensemble, mutual_learning_losses
from lightning_kd.losses.relation import cc_loss, pkt_loss, rkd_loss, sp_loss
from lightning_kd.losses.chunked import TokenLosses, chunked_distillation_loss
from lightning_kd.losses.sparse import sparse_divergence_per_token, sparse_teacher, sparse_token_distillation_loss
from lightning_kd.losses.token import (
    DIVERGENCES,
    divergence_per_token,
    forward_kl_loss,
    forward_kl_per_token,
    generalized_jsd_loss,
    generalized_jsd_per_token,
    global_token_count,
    reverse_kl_loss,
    reverse_kl_per_token,
    skew_forward_kl_loss,
    skew_forward_kl_per_token,
    skew_reverse_kl_loss,
    skew_reverse_kl_per_token,
    token_distillation_loss,
    total_variation_loss,
    total_variation_per_token,
    valid_token_mask,
)

__all__ = [
    "mlkd_loss",
    "rld_loss",
    "virtual_teacher_loss",
    "virtual_teacher_probs",
    "cosine_lambda",
    "ctkd_temperature",
    "dist_loss",
    "dkd_loss",
    "gradient_reversal",
    "kd_loss",
    "normkd_loss",
    "standardize_logits",
    "at_loss",
    "fitnet_loss",
    "logsum_distance",
    "nst_loss",
    "ab_loss",
    "fsp_loss",
    "fsp_matrix",
    "ft_loss",
    "pool_to_common_size",
    "vid_loss",
    "batch_moments",
    "bn_statistics_loss",
    "logit_l1_discrepancy",
    "hcl_loss",
    "ofd_loss",
    "ofd_margin",
    "ofd_margin_from_bn",
    "cc_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
    "dml_loss",
    "mean_logit_ensemble",
    "min_logit_ensemble",
    "mutual_learning_losses",
    "contrast_scores",
    "crd_loss",
    "nce_loss",
    "nce_normalizer",
    "DIVERGENCES",
    "divergence_per_token",
    "forward_kl_loss",
    "forward_kl_per_token",
    "generalized_jsd_loss",
    "generalized_jsd_per_token",
    "global_token_count",
    "reverse_kl_loss",
    "reverse_kl_per_token",
    "skew_forward_kl_loss",
    "skew_forward_kl_per_token",
    "skew_reverse_kl_loss",
    "skew_reverse_kl_per_token",
    "token_distillation_loss",
    "total_variation_loss",
    "total_variation_per_token",
    "valid_token_mask",
    "TokenLosses",
    "chunked_distillation_loss",
    "sparse_divergence_per_token",
    "sparse_teacher",
    "sparse_token_distillation_loss",
]
