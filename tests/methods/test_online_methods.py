"""Online distillation (DML, KDCL): peers train out of the box, each peer is trained by its own terms only, per-peer
metrics are logged, the best peer is exported, checkpoints round-trip, bad peers are clear errors, and 2-process
CPU DDP trains and logs."""

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import make_trainer, random_loader, snapshot
from lightning_kd.cli import main
from lightning_kd.losses import kd_loss
from lightning_kd.losses.online import mean_logit_ensemble, min_logit_ensemble, mutual_learning_losses
from lightning_kd.methods.base import Batch
from lightning_kd.methods.dml import DML
from lightning_kd.methods.kdcl import KDCL
from lightning_kd.models import create_model

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"DML": (DML, "kl"), "KDCL": (KDCL, "kd")}




def digits_peers(method, peers=("cnn_small",), **kwargs):
    return method(student="cnn_tiny", peers=list(peers), num_classes=10, in_chans=1, **kwargs)


def peer_of(loss_name: str) -> int:
    return 0 if loss_name == "ce" else int(loss_name.rsplit("peer", 1)[1])


@pytest.mark.parametrize("pair", ["digits", "resnet", "timm"])
@pytest.mark.parametrize("name", list(METHODS))
def test_trains_out_of_the_box(name, pair, digits):
    method, term = METHODS[name]
    torch.manual_seed(0)
    if pair == "digits":
        model, data = digits_peers(method), {"datamodule": digits}
    elif pair == "resnet":
        model = method(student="resnet8x4", peers=["resnet32x4"], num_classes=100)
        data = {"train_dataloaders": random_loader(100)}
    else:
        model = method(student="timm:resnet10t", peers=["timm:resnet18"], num_classes=10)
        data = {"train_dataloaders": random_loader(10)}
    before = [snapshot(peer) for peer in model.peer_models()]
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, **data)
    for loss in ("", "_ce", "_ce_peer1", f"_{term}_peer0", f"_{term}_peer1"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"]), f"train/loss{loss} missing or not finite"
    for index, (peer, state) in enumerate(zip(model.peer_models(), before)):
        assert any(not torch.equal(v, peer.state_dict()[k]) for k, v in state.items()), f"peer {index} not trained"


def test_default_peers_are_a_differently_initialised_copy_of_the_student():
    torch.manual_seed(0)
    model = DML(student="cnn_tiny", num_classes=10, in_chans=1)
    assert model.num_peers == 2 and model.hparams.peers is None
    assert type(model.peer(1)) is type(model.student)
    assert not torch.equal(model.peer(1).fc.weight, model.student.fc.weight)
    assert (model.hparams.kl_weight, model.hparams.temperature, model.hparams.ce_weight) == (1.0, 1.0, 1.0)
    kdcl = KDCL(student="cnn_tiny", num_classes=10, in_chans=1)
    assert (kdcl.hparams.ensemble, kdcl.hparams.temperature, kdcl.hparams.kd_weight) == ("min_logit", 3.0, 1.0)


def peer_batch(model, seed=0, batch=6):
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator))


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


@pytest.mark.parametrize("name", list(METHODS))
def test_each_peer_gets_gradients_only_from_its_own_terms(name):
    torch.manual_seed(0)
    model = digits_peers(METHODS[name][0], peers=("cnn_small", "cnn_tiny"))
    batch = peer_batch(model)
    out = model.forward_student(batch)
    losses = {"ce": model.cross_entropy(out.logits, batch.target), **model.distillation_losses(batch, out, None)}
    assert len(losses) == 6
    for loss_name, value in losses.items():
        for index, peer in enumerate(model.peer_models()):
            grads = torch.autograd.grad(value, list(peer.parameters()), retain_graph=True, allow_unused=True)
            norm = sum(g.abs().sum() for g in grads if g is not None)
            if index == peer_of(loss_name):
                assert norm > 0, f"{loss_name} gives peer {index} no gradient"
            else:
                assert norm == 0, f"{loss_name} leaks a gradient into peer {index}"


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


def manual_accuracy(model, images, targets):
    with torch.no_grad():
        logits = [peer.eval()(images) for peer in model.peer_models()]
    per_peer = [(z.argmax(1) == targets).float().mean().item() for z in logits]
    ensemble = torch.stack([z.softmax(1) for z in logits]).mean(0)
    return per_peer, (ensemble.argmax(1) == targets).float().mean().item()


@pytest.mark.parametrize("name", list(METHODS))
def test_per_peer_metrics_are_logged_and_the_best_peer_is_exported(name, digits, tmp_path):
    torch.manual_seed(0)
    model = digits_peers(METHODS[name][0], peers=("cnn_small", "cnn_tiny"))
    assert model.best_peer() == 0 and torch.isnan(model.peer_val_acc).all()
    trainer = make_trainer(max_epochs=1, limit_train_batches=6)
    trainer.fit(model, digits)
    images, targets = digits.datasets["val"].tensors
    per_peer, ensemble = manual_accuracy(model, images, targets)
    logged = trainer.callback_metrics
    for index, accuracy in enumerate(per_peer):
        assert logged[f"val/acc_peer{index}"].item() == pytest.approx(accuracy, abs=1e-6)
        assert model.peer_val_acc[index].item() == pytest.approx(accuracy, abs=1e-6)
    assert logged["val/acc_ensemble"].item() == pytest.approx(ensemble, abs=1e-6)
    assert logged["val/acc"].item() == pytest.approx(per_peer[0], abs=1e-6)
    assert len(set(per_peer)) > 1, "the peers should differ after training"
    assert model.best_peer() == max(range(3), key=lambda i: (per_peer[i], -i))

    model.peer_val_acc.copy_(torch.tensor([0.2, 0.5, 0.9]))
    model.export_student(tmp_path / "best.pt")
    model.export_peer(1, tmp_path / "peer1.pt")
    for path, index, architecture in (("best.pt", 2, "cnn_tiny"), ("peer1.pt", 1, "cnn_small")):
        deployed = create_model(architecture, num_classes=10, in_chans=1)
        deployed.load_state_dict(torch.load(tmp_path / path, weights_only=True))
        assert torch.equal(deployed.eval()(images), model.peer(index).eval()(images)), path
    test_metrics = trainer.test(model, digits, verbose=False)[0]
    assert {f"test/acc_peer{i}" for i in range(3)} | {"test/acc_ensemble"} <= set(test_metrics)
    with pytest.raises(IndexError, match="peers are 0 to 2"):
        model.peer(3)


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_round_trip(name, digits, tmp_path):
    method = METHODS[name][0]
    torch.manual_seed(0)
    model = digits_peers(method)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "online.ckpt")
    checkpoint = torch.load(tmp_path / "online.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["peers"] == ["cnn_small"]
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} >= {"student", "peers", "peer_val_acc"}
    restored = method.load_from_checkpoint(tmp_path / "online.ckpt")
    assert torch.isfinite(model.peer_val_acc).all()
    assert torch.equal(restored.peer_val_acc, model.peer_val_acc) and restored.best_peer() == model.best_peer()
    for original, loaded in zip(model.peer_models(), restored.peer_models()):
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    # peers given as modules are not hyper-parameters: they are passed again, their weights come from the checkpoint
    torch.manual_seed(1)
    student, peer = create_model("cnn_tiny", num_classes=10, in_chans=1), create_model("cnn_small", num_classes=10,
                                                                                         in_chans=1)
    model = method(student=student, peers=[peer], num_classes=10)
    assert "peers" not in model.hparams
    make_trainer(max_steps=2, limit_val_batches=1).fit(model, digits)
    model.trainer.save_checkpoint(tmp_path / "modules.ckpt")
    assert "peers" not in torch.load(tmp_path / "modules.ckpt", weights_only=True)["hyper_parameters"]
    restored = method.load_from_checkpoint(tmp_path / "modules.ckpt",
                                           student=create_model("cnn_tiny", num_classes=10, in_chans=1),
                                           peers=[create_model("cnn_small", num_classes=10, in_chans=1)])
    for key, value in peer.state_dict().items():
        assert torch.equal(restored.peer(1).state_dict()[key], value), key


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


@pytest.mark.parametrize("name", list(METHODS))
def test_peers_with_another_class_count_are_a_clear_error(name, digits):
    model = METHODS[name][0](student="cnn_tiny", peers=[create_model("cnn_tiny", num_classes=5, in_chans=1)],
                             num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"peer 1 of .* shape \(64, 5\) but num_classes is 10: .*num_classes=10"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, digits)


def test_unknown_ensemble_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ensemble 'median'.*'min_logit', 'mean_logit'"):
        KDCL(student="cnn_tiny", num_classes=10, ensemble="median")


CONFIGS = {"cifar100/dml/resnet32_resnet32.yaml": ("DML", "resnet32", ["resnet32"]),
           "cifar100/kdcl/resnet32_resnet32.yaml": ("KDCL", "resnet32", ["resnet32"]),
           "digits/dml.yaml": ("DML", "cnn_tiny", ["cnn_small"])}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_resolve_and_keep_model_names(config, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/experiments" / config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    name, student, peers = CONFIGS[config]
    init_args = resolved["model"]["init_args"]
    assert resolved["model"]["class_path"].endswith(f".{name}") and init_args["teacher"] is None
    assert (init_args["student"], init_args["peers"]) == (student, peers)


def test_digits_config_fits_through_the_cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    cli = main(["fit", "--config", str(ROOT / "configs/experiments/digits/dml.yaml"), "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.model, DML) and cli.model.num_peers == 2 and cli.model.hparams.in_chans == 1
    assert torch.isfinite(cli.model.peer_val_acc).all()
    assert {"val/acc_peer0", "val/acc_peer1", "val/acc_ensemble"} <= set(cli.trainer.callback_metrics)


DDP_SCRIPT = textwrap.dedent("""
    import sys

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from lightning_kd.data import DigitsDataModule
    from lightning_kd.methods.dml import DML
    from lightning_kd.methods.kdcl import KDCL

    out = sys.argv[1]
    for method in (DML, KDCL):  # both fits run in the same two processes
        torch.manual_seed(0)
        model = method(student="cnn_tiny", peers=["cnn_tiny", "cnn_small"], num_classes=10, in_chans=1)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4,
                            logger=CSVLogger(out, name=method.__name__), log_every_n_steps=1,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, DigitsDataModule(batch_size=64))
        torch.save(model.state_dict(), f"{out}/{method.__name__}_rank{trainer.global_rank}.pt")
""")


@pytest.mark.ddp
def test_two_process_ddp_on_cpu_trains_logs_and_checkpoints(tmp_path):
    script = tmp_path / "online_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (method, term) in METHODS.items():
        ranks = [torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True) for rank in range(2)]
        assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("peers.1.") for k in ranks[0])
        for key, value in ranks[0].items():
            assert torch.equal(value, ranks[1][key]), f"{name}: {key} differs between the processes"
        rows = list(csv.DictReader((tmp_path / name / "version_0" / "metrics.csv").open()))
        val = [r for r in rows if r.get("val/acc_ensemble")]
        train = [r for r in rows if r.get(f"train/loss_{term}_peer2")]
        assert len(val) == 1 and len(train) == 4, name
        # the stored accuracies are those of the whole validation set, gathered from both processes
        logged = [float(val[0][f"val/acc_peer{i}"]) for i in range(3)]
        assert ranks[0]["peer_val_acc"].tolist() == pytest.approx(logged, abs=1e-6)
        restored = method.load_from_checkpoint(next((tmp_path / name).rglob("*.ckpt")))
        assert restored.num_peers == 3 and restored.best_peer() == max(range(3), key=lambda i: (logged[i], -i))
        for key, value in restored.state_dict().items():
            assert torch.equal(value, ranks[0][key]), f"{name}: {key} differs in the checkpoint"
