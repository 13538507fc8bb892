"""Distillation losses as pure functions (torchmetrics-style functional API), one module per family, all
re-exported here:

* :mod:`~lightning_kd.losses.logit` -- losses on the logits: KD, DKD, DIST, NormKD, logit standardization.
* :mod:`~lightning_kd.losses.logit_refined` -- logit losses that refine what the student matches: RLD's
  label-refined teacher, Tf-KD's virtual teacher, MLKD's multi-level alignment.
* :mod:`~lightning_kd.losses.feature` -- one student feature (map) against one teacher feature: AT, NST,
  FitNets, the LogSum distance, VID, FSP, AB, FT and the pooling to a common size.
* :mod:`~lightning_kd.losses.feature_fusion` -- losses on fused or pre-activation features: OFD's margin
  loss, ReviewKD's hierarchical context loss.
* :mod:`~lightning_kd.losses.relation` -- relations between the samples of a batch: RKD, SP, CC, PKT.
* :mod:`~lightning_kd.losses.contrastive` -- CRD's contrastive (NCE) loss against a memory bank.
* :mod:`~lightning_kd.losses.online` -- online (teacher-free) distillation among peers: DML, ensembles of
  the peers' logits.
* :mod:`~lightning_kd.losses.datafree` -- data-free distillation: the batch-norm statistics loss and the
  teacher-student discrepancy on generated inputs.
* :mod:`~lightning_kd.losses.token` -- token-level divergences of language models (forward/reverse KL,
  skew KL, generalized JSD, total variation) over the valid tokens.
* :mod:`~lightning_kd.losses.chunked` -- the token losses computed chunk by chunk from hidden states,
  without materializing the full vocabulary logits.
* :mod:`~lightning_kd.losses.sparse` -- the token losses against a sparse teacher (its top-k
  log-probabilities plus one tail bucket).

CTKD's learnable temperature is not a loss; it lives in :mod:`lightning_kd.nn.temperature`.
"""

from lightning_kd.losses.contrastive import contrast_scores, crd_loss, nce_loss, nce_normalizer
from lightning_kd.losses.datafree import batch_moments, bn_statistics_loss, logit_l1_discrepancy
from lightning_kd.losses.feature import (
    ab_loss,
    at_loss,
    fitnet_loss,
    fsp_loss,
    fsp_matrix,
    ft_loss,
    logsum_distance,
    nst_loss,
    pool_to_common_size,
    vid_loss,
)
from lightning_kd.losses.feature_fusion import hcl_loss, ofd_loss, ofd_margin, ofd_margin_from_bn
from lightning_kd.losses.logit import (
    dist_loss,
    dkd_loss,
    kd_loss,
    normkd_loss,
    standardize_logits,
)
from lightning_kd.losses.logit_refined import mlkd_loss, rld_loss, virtual_teacher_loss, virtual_teacher_probs
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
    "dist_loss",
    "dkd_loss",
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
