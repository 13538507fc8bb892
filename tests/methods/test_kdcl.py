"""Tests of lightning_kd.methods.kdcl (KDCL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import digits_peers, peer_batch
from lightning_kd.losses import kd_loss
from lightning_kd.losses.online import mean_logit_ensemble, min_logit_ensemble
from lightning_kd.methods.kdcl import KDCL


@pytest.mark.parametrize("ensemble", ["min_logit", "mean_logit"])
def test_kdcl_loss_is_kd_towards_the_detached_ensemble(ensemble):
    torch.manual_seed(0)
    model = digits_peers(KDCL, peers=("cnn_small", "cnn_tiny"), ensemble=ensemble, kd_weight=0.5, ce_weight=2.0)
    batch = peer_batch(model)
    out = model.forward_student(batch)
    losses = model.distillation_losses(batch, out, None)
    logits = [peer(batch.input) for peer in model.peer_models()]
    teacher = (min_logit_ensemble(logits, batch.target) if ensemble == "min_logit" else mean_logit_ensemble(logits))
    assert set(losses) == {"ce_peer1", "ce_peer2", "kd_peer0", "kd_peer1", "kd_peer2"}
    for k in range(3):
        assert torch.allclose(losses[f"kd_peer{k}"], 0.5 * kd_loss(logits[k], teacher, 3.0), rtol=1e-5)
        assert losses[f"kd_peer{k}"] > 0
    for k in (1, 2):
        assert torch.allclose(losses[f"ce_peer{k}"], 2.0 * F.cross_entropy(logits[k], batch.target), rtol=1e-5)


def test_unknown_ensemble_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ensemble 'median'.*'min_logit', 'mean_logit'"):
        KDCL(student="cnn_tiny", num_classes=10, ensemble="median")
