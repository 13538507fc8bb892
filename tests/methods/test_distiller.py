"""Distiller: any terms in one run, from Python and from YAML, with their own arguments, weights and log names."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_kd.data import DigitsDataModule
from lightning_kd.methods import CRD, Distiller, KD
from lightning_kd.methods import base as method_base
from lightning_kd.methods.base import Batch
from lightning_kd.models import create_model
from lightning_kd.terms import ATTerm, CRDTerm, DKDTerm, FitNetTerm, KDTerm

from conftest import make_trainer

ROOT = Path(__file__).resolve().parents[2]


def naive_kd(student, teacher, temperature):
    """T² · Σ_c p_t log(p_t / p_s), averaged over the batch."""
    p_t = F.softmax(teacher.double() / temperature, dim=1)
    log_p_s = F.log_softmax(student.double() / temperature, dim=1)
    return (p_t * (p_t.log() - log_p_s)).sum(1).mean() * temperature ** 2


def naive_attention_loss(s, t):
    """Mean over batch and positions of the squared difference of L2-normalised mean_c f² maps."""
    q_s = F.normalize(s.double().pow(2).mean(1).flatten(1), dim=1)
    q_t = F.normalize(t.double().pow(2).mean(1).flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()


def test_two_terms_sum_with_their_own_weights_and_log_names():
    torch.manual_seed(0)
    student, teacher = create_model("cnn_tiny", num_classes=10, in_chans=1), create_model("cnn_small", num_classes=10,
                                                                                            in_chans=1)
    model = Distiller(student, teacher, num_classes=10, ce_weight=0.5,
                      terms={"soft": KDTerm(temperature=3.0, weight=0.7),
                             "attention": ATTerm(weight=20.0, student_layers=["stages.1"],
                                                 teacher_layers=["stages.1"])})
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    loss = model.training_step((images, labels), 0)
    feats = {}
    hooks = [m.stages[1].register_forward_hook(lambda mod, a, out, key=key: feats.__setitem__(key, out))
             for key, m in (("s", student), ("t", teacher))]
    with torch.no_grad():
        s_logits, t_logits = student(images), teacher(images)
    for hook in hooks:
        hook.remove()
    expected = {"ce": 0.5 * F.cross_entropy(s_logits.double(), labels),
                "soft_kd": 0.7 * naive_kd(s_logits, t_logits, 3.0),
                "attention_at": 20.0 * naive_attention_loss(feats["s"], feats["t"])}
    assert loss.item() == pytest.approx(sum(expected.values()).item(), rel=1e-5)
    for name, value in expected.items():
        assert logged[f"train/loss_{name}"] == pytest.approx(value.item(), rel=1e-5), name


def test_a_layer_read_by_two_terms_is_hooked_once(monkeypatch):
    requested = []
    capture = method_base.capture_features

    def recording(model, layers):
        requested.append(list(layers))
        return capture(model, layers)

    monkeypatch.setattr(method_base, "capture_features", recording)
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                      terms={"hint": FitNetTerm(student_layer="stages.1", teacher_layer="stages.1"),
                             "at": ATTerm(student_layers=["stages.0", "stages.1"],
                                          teacher_layers=["stages.0", "stages.1"])})
    assert model.student_layers == ["stages.1", "stages.0"] and model.teacher_layers == ["stages.1", "stages.0"]
    requested.clear()
    model.training_step((torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), 0)
    assert requested == [["stages.1", "stages.0"], ["stages.1", "stages.0"]]  # teacher, then student


def test_terms_keep_their_own_arguments_of_the_same_name():
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1,
                      terms={"early": DKDTerm(warmup_epochs=2), "late": DKDTerm(warmup_epochs=8, beta=2.0)})
    assert model.terms["early"].warmup_epochs == 2 and model.terms["late"].warmup_epochs == 8
    assert model.terms["early"].ramp() == pytest.approx(1 / 2) and model.terms["late"].ramp() == pytest.approx(1 / 8)
    assert model.hparams.terms["late"]["init_args"]["beta"] == 2.0
    assert model.hparams.terms["early"]["init_args"]["beta"] == 8.0


def test_composite_equals_the_method_it_spells_out(digits):
    """CRD(kd_weight=1) and Distiller(crd=CRDTerm, kd=KDTerm) are the same run."""
    def run(make):
        L.seed_everything(0)
        model = make()
        make_trainer(max_steps=3, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
        return model

    common = dict(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    method = run(lambda: CRD(**common, kd_weight=1.0, num_negatives=32, embedding_dim=16))
    composite = run(lambda: Distiller(**common, terms={"crd": CRDTerm(num_negatives=32, embedding_dim=16, weight=0.8),
                                                       "kd": KDTerm(weight=1.0)}))
    for key, value in method.state_dict().items():
        assert torch.equal(value, composite.state_dict()[key]), key


def test_bad_terms_get_one_clear_error():
    with pytest.raises(ValueError, match="at least one term"):
        Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, terms={})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, terms={"my kd": KDTerm()})
    with pytest.raises(ValueError, match="cannot find the class 'NoSuchTerm'"):
        Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, terms={"kd": {"class_path": "NoSuchTerm"}})
    with pytest.raises(TypeError, match="not a DistillationTerm subclass"):
        Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1,
                  terms={"kd": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}}})
    with pytest.raises(ValueError, match="distils from a teacher"):
        Distiller("cnn_tiny", num_classes=10, in_chans=1, terms={"kd": KDTerm()})
    with pytest.raises(TypeError, match="must be numbers, strings"):
        Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, terms={"kd": KDTerm(temperature=torch.tensor(2.0))})


def test_specs_rebuild_the_terms_and_checkpoints_hold_no_objects(tmp_path, digits):
    torch.manual_seed(0)
    torch.save(create_model("cnn_small", num_classes=10, in_chans=1).state_dict(), tmp_path / "teacher.pt")
    model = Distiller("cnn_tiny", "cnn_small", teacher_weights=str(tmp_path / "teacher.pt"), num_classes=10,
                      in_chans=1, terms={"hint": {"class_path": "FitNetTerm", "init_args": {"hint_layer": 1}},
                                         "kd": KDTerm(temperature=2.0)})
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "composite.ckpt")
    checkpoint = torch.load(tmp_path / "composite.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["terms"]["kd"] == {
        "class_path": "lightning_kd.terms.logit.KDTerm",
        "init_args": {**checkpoint["hyper_parameters"]["terms"]["kd"]["init_args"], "temperature": 2.0}}
    restored = Distiller.load_from_checkpoint(tmp_path / "composite.ckpt")
    assert isinstance(restored.terms["hint"], FitNetTerm) and restored.terms["kd"].temperature == 2.0
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_command_line_fit_from_yaml_then_test_from_the_checkpoint_alone(tmp_path, monkeypatch):
    from lightning_kd.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    torch.manual_seed(0)
    torch.save(create_model("cnn_small", num_classes=10, in_chans=1).state_dict(), tmp_path / "teacher.pt")
    config = {"model": {"class_path": "Distiller", "init_args": {
        "student": "cnn_tiny", "teacher": "cnn_small", "teacher_weights": str(tmp_path / "teacher.pt"),
        "terms": {"kd": {"class_path": "KDTerm", "init_args": {"temperature": 2.0, "weight": 0.5}},
                  "at": {"class_path": "lightning_kd.terms.ATTerm", "init_args": {"weight": 10.0}}}}}}
    (tmp_path / "composite.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "composite.yaml"), "--data", str(ROOT / "configs/data/digits.yaml"),
          "--trainer", str(ROOT / "configs/trainer/cpu_quick.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    terms = torch.load(checkpoint, weights_only=True)["hyper_parameters"]["terms"]
    assert terms["kd"]["init_args"]["weight"] == 0.5 and terms["at"]["class_path"].endswith("ATTerm")
    cli = main(["test", "--data", str(ROOT / "configs/data/digits.yaml"), "--ckpt_path", str(checkpoint),
                "--trainer", str(ROOT / "configs/trainer/cpu_quick.yaml"), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.model, Distiller) and set(cli.model.terms) == {"kd", "at"}
    assert cli.model.terms["kd"].temperature == 2.0
    assert 0.0 <= cli.trainer.callback_metrics["test/acc"] <= 1.0


DDP_SCRIPT = textwrap.dedent("""
    import sys

    import lightning as L
    import torch

    from lightning_kd.data import DigitsDataModule
    from lightning_kd.methods import Distiller
    from lightning_kd.terms import FitNetTerm, KDTerm

    out = sys.argv[1]
    torch.manual_seed(0)
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1,
                      terms={"hint": FitNetTerm(hint_layer=1, weight=10.0), "kd": KDTerm()})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    torch.save(model.state_dict(), f"{out}/rank{trainer.global_rank}.pt")
""")


@pytest.mark.ddp
def test_two_process_ddp_trains_a_composite_with_a_trainable_term(tmp_path):
    script = tmp_path / "composite_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert any(key.startswith("terms.hint.projector.") for key in ranks[0])
    fresh = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                      terms={"hint": FitNetTerm(hint_layer=1, weight=10.0), "kd": KDTerm()})
    for key, value in ranks[0].items():  # BatchNorm statistics are each process's own (no SyncBatchNorm)
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, ranks[1][key]), f"{key} differs between the processes"
    moved = [key for key in ranks[0] if key.startswith("terms.hint.projector.") and key.endswith("weight")
             and not torch.equal(ranks[0][key], fresh.state_dict()[key])]
    assert moved, "the projector was not trained"


@pytest.mark.parametrize("name", ["crd_kd", "kd_at", "dkd_reviewkd"])
def test_the_composed_cifar100_configs_build_and_take_a_step(name):
    init_args = yaml.safe_load((ROOT / f"configs/experiments/cifar100/compose/{name}.yaml").read_text())["model"][
        "init_args"]
    terms = copy.deepcopy(init_args["terms"])
    if "crd" in terms:
        terms["crd"]["init_args"].update(num_samples=8, num_negatives=4)
    torch.manual_seed(0)
    model = Distiller(init_args["student"], init_args["teacher"], num_classes=100, ce_weight=init_args["ce_weight"],
                      input_shape=(3, 32, 32), terms=terms)
    model.log = lambda *args, **kwargs: None
    batch = Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    if "crd" in model.terms:  # the classes of the 8 training samples the memory banks hold
        model.terms["crd"].train_targets.copy_(torch.arange(8) % 4)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and set(model.terms) == set(init_args["terms"])
    assert model.student.fc.weight.grad.abs().sum() > 0
