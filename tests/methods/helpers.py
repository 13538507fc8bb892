"""Helpers shared by several method test files (imported as ``helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.methods import Batch, ModelOutput
from lightning_kd.methods.ab import AB
from lightning_kd.methods.fsp import FSP
from lightning_kd.methods.ft import FT
from lightning_kd.methods.ofd import OFD
from lightning_kd.methods.reviewkd import ReviewKD
from lightning_kd.methods.vid import VID


def logits_pair(seed=0, batch=6, classes=10):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator) * 3, torch.randn(batch, classes, generator=generator) * 3,
            torch.randint(0, classes, (batch,), generator=generator))


def at_epoch(monkeypatch, method, epoch):
    monkeypatch.setattr(method, "current_epoch", property(lambda self: epoch))


def method_losses(model, student, teacher, target):
    return model.distillation_losses(Batch(torch.zeros(len(target)), target), ModelOutput(student),
                                     None if teacher is None else ModelOutput(teacher))


ADAPTER_METHODS = {"VID": VID, "FSP": FSP, "AB": AB, "FT": FT}


INIT_METHODS = ["FSP", "AB", "FT"]


#: the trainable parts of each method (attribute names)
ADAPTER_PARTS = {"VID": ["regressors"], "FSP": ["connectors"], "AB": ["connectors"],
                 "FT": ["paraphraser", "translator"]}


ADAPTER_ZOO_LAYERS = {"VID": ["layer1", "layer2", "layer3"], "FSP": ["relu", "layer1", "layer2", "layer3"],
                      "FT": ["layer3"]}


def adapter_kd(name: str, **kwargs):
    """The method with a one-epoch init phase where it has one."""
    if name in INIT_METHODS:
        kwargs.setdefault("init_epochs", 1)
    return ADAPTER_METHODS[name](**kwargs)


def parameter_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


class OptimizedParameters(Callback):
    """Records, for every training step, the parameters the optimizer holds and its learning rate."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.params.append({id(p) for group in groups for p in group["params"]})
        self.lrs.append(groups[0]["lr"])


FUSION_METHODS = {"OFD": OFD, "ReviewKD": ReviewKD}


FUSION_PAIRS = {"digits": ("cnn_tiny", "cnn_small", 10, 1), "resnet": ("resnet8x4", "resnet32x4", 100, 3),
                "timm": ("timm:resnet10t", "timm:resnet18", 10, 3)}


ZOO_PREACT = {"student": [f"layer{i}.0.preact" for i in (1, 2, 3)],
              "teacher": [f"layer{i}.4.preact" for i in (1, 2, 3)]}


TIMM_PREACT = {"student": [f"layer{i}.0.act2:input" for i in (1, 2, 3, 4)],
               "teacher": [f"layer{i}.1.act2:input" for i in (1, 2, 3, 4)]}


FUSION_LAYERS = {
    ("OFD", "digits"): (["stages.1.1.2:input"], ["stages.1.1.2:input"]),
    ("OFD", "resnet"): (ZOO_PREACT["student"], ZOO_PREACT["teacher"]),
    ("OFD", "timm"): (TIMM_PREACT["student"], TIMM_PREACT["teacher"]),
    ("ReviewKD", "digits"): (["stages.1", "pool"], ["stages.1.1.2:input", "pool"]),
    ("ReviewKD", "resnet"): (["layer1", "layer2", "layer3", "avgpool"], ZOO_PREACT["teacher"] + ["avgpool"]),
    ("ReviewKD", "timm"): (["layer1", "layer2", "layer3", "layer4", "fc:input"], TIMM_PREACT["teacher"] + ["fc:input"]),
}


def fusion_kd(name: str, pair: str, **kwargs):
    student, teacher, num_classes, in_chans = FUSION_PAIRS[pair]
    return FUSION_METHODS[name](student=student, teacher=teacher, num_classes=num_classes, in_chans=in_chans, **kwargs)


ROOT = Path(__file__).resolve().parents[2]


def digits_peers(method, peers=("cnn_small",), **kwargs):
    return method(student="cnn_tiny", peers=list(peers), num_classes=10, in_chans=1, **kwargs)


def peer_batch(model, seed=0, batch=6):
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator))


class StepRecorder(Callback):
    """Per step: the batch the loader gave, what student and teacher received and returned, and the mixing."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        def record(role):
            def hook(module, args, output):
                self.steps[-1].update({f"{role}_in": args[0].detach().clone(), f"{role}_out": output.detach().clone(),
                                       f"{role}_mixing": pl_module.mixing})
            return hook

        pl_module.student.register_forward_hook(record("student"))
        pl_module.teacher.register_forward_hook(record("teacher"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"stage": "train", "input": batch[0].clone(), "target": batch[1].clone()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.steps.append({"stage": "val", "input": batch[0].clone(), "target": batch[1].clone()})


def assert_step_is_ce_plus(model, student_layers, teacher_layers, distillation, seed=0):
    """One training step of ``model`` (cnn models on 8×8 digits-like inputs) equals ``ce_weight · CE`` plus
    ``distillation(student_feats, teacher_feats)``, the features of the named layers taken with plain forward hooks
    (independent of the method's own feature capture)."""
    from conftest import hooked_features

    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    model.log = lambda *args, **kwargs: None
    loss = model.training_step((images, labels), 0)
    with torch.no_grad():
        student_feats = hooked_features(model.student, student_layers, images)
        teacher_feats = hooked_features(model.teacher, teacher_layers, images)
        ce = torch.nn.functional.cross_entropy(model.student(images), labels)
        expected = model.hparams.ce_weight * ce + distillation(student_feats, teacher_feats)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
