"""Tests of lightning_kd.methods.dml (DML) and the peers it trains."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import make_trainer
from helpers import ROOT, digits_peers, peer_batch
from lightning_kd.cli import main
from lightning_kd.losses.online import mutual_learning_losses
from lightning_kd.methods.dml import DML
from lightning_kd.methods.kdcl import KDCL
from lightning_kd.models import create_model


def test_default_peers_are_a_differently_initialised_copy_of_the_student():
    torch.manual_seed(0)
    model = DML(student="cnn_tiny", num_classes=10, in_chans=1)
    assert model.num_peers == 2 and model.hparams.peers is None
    assert type(model.peer(1)) is type(model.student)
    assert not torch.equal(model.peer(1).fc.weight, model.student.fc.weight)
    assert (model.hparams.kl_weight, model.hparams.temperature, model.hparams.ce_weight) == (1.0, 1.0, 1.0)
    kdcl = KDCL(student="cnn_tiny", num_classes=10, in_chans=1)
    assert (kdcl.hparams.ensemble, kdcl.hparams.temperature, kdcl.hparams.kd_weight) == ("min_logit", 3.0, 1.0)


def test_dml_loss_is_the_mean_kl_from_the_other_peers():
    torch.manual_seed(0)
    model = digits_peers(DML, peers=("cnn_small", "cnn_tiny"), kl_weight=0.5, temperature=2.0)
    batch = peer_batch(model)
    losses = model.distillation_losses(batch, model.forward_student(batch), None)
    logits = [peer(batch.input) for peer in model.peer_models()]
    expected = mutual_learning_losses(logits, 2.0)
    assert set(losses) == {"ce_peer1", "ce_peer2", "kl_peer0", "kl_peer1", "kl_peer2"}
    for k in range(3):
        assert torch.allclose(losses[f"kl_peer{k}"], 0.5 * expected[k], rtol=1e-5) and expected[k] > 0


def test_channels_last_applies_to_every_peer(digits):
    model = digits_peers(DML, channels_last=True)
    make_trainer(max_steps=1, limit_val_batches=0).fit(model, digits)
    for peer in model.peer_models():
        weight = [m for m in peer.modules() if isinstance(m, nn.Conv2d)][-1].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_one_optimizer_updates_every_peer():
    model = digits_peers(DML, peers=("cnn_small", "cnn_tiny"))
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for peer in model.peer_models() for p in peer.parameters()}


def test_fewer_than_two_peers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at least 2 peers, but got the student alone .*peers=\['resnet32'\]"):
        DML(student="cnn_tiny", peers=[], num_classes=10)
    with pytest.raises(ValueError, match=r"as a list: pass peers=\['cnn_tiny'\]"):
        DML(student="cnn_tiny", peers="cnn_tiny", num_classes=10)
    with pytest.raises(ValueError, match="no peers: pass peers="):
        KDCL(student=create_model("cnn_tiny"), num_classes=10)
    shared = create_model("cnn_tiny")
    with pytest.raises(ValueError, match="same nn.Module as two peers"):
        DML(student=shared, peers=[shared], num_classes=10)


def test_digits_config_fits_through_the_cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    cli = main(["fit", "--config", str(ROOT / "configs/experiments/digits/dml.yaml"), "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.model, DML) and cli.model.num_peers == 2 and cli.model.hparams.in_chans == 1
    assert torch.isfinite(cli.model.peer_val_acc).all()
    assert {"val/acc_peer0", "val/acc_peer1", "val/acc_ensemble"} <= set(cli.trainer.callback_metrics)
