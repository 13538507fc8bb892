"""Every shipped config resolves through the CLI: fit configs with --print_config, experiment files run by run."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main
from lightning_kd.methods.base import sgd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").rglob("*.yaml"))
FIT_CONFIGS = [p for p in EXPERIMENTS if "runs" not in yaml.safe_load(p.read_text())]
RUNNER_FILES = [p for p in EXPERIMENTS if p not in FIT_CONFIGS]
DEFAULT_OPTIMIZER = "lightning_kd.methods.base.sgd"  # how --print_config shows the base's default
# optimizer arguments that choose an implementation, not the optimization
IMPLEMENTATION = {"foreach", "fused", "differentiable", "capturable"}


def build_optimizer(optimizer) -> torch.optim.Optimizer:
    """The optimizer that a config's ``optimizer`` value (the default's name or a class_path mapping) builds."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    if optimizer == DEFAULT_OPTIMIZER:
        return sgd(params)
    module, name = optimizer["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(params, **optimizer.get("init_args", {}))


def restates_default_optimizer(optimizer) -> bool:
    """True when a config spells out the default optimizer (same class and hyper-parameters) instead of leaving it
    out: the spelled-out one loses the default's fused CUDA kernel."""
    if optimizer == DEFAULT_OPTIMIZER or isinstance(optimizer, str):  # a method's own default (e.g. lm.adamw)
        return False
    built, default = build_optimizer(optimizer), sgd([torch.nn.Parameter(torch.zeros(1))])

    def hyper_parameters(opt):
        return {k: v for k, v in opt.defaults.items() if k not in IMPLEMENTATION}

    return type(built) is type(default) and hyper_parameters(built) == hyper_parameters(default)


RESTATED_MESSAGE = ("sets the default optimizer (SGD lr 0.05, momentum 0.9, weight decay 5e-4); leave the optimizer "
                    "out so that the default applies (lightning_kd.methods.base.sgd, fused on CUDA)")


def resolve(args, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    monkeypatch.chdir(ROOT)


def test_the_standard_pairs_and_methods_have_configs():
    names = {p.relative_to(ROOT / "configs" / "experiments").as_posix() for p in FIT_CONFIGS}
    for pair in ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "resnet56_resnet20", "resnet110_resnet32", "vgg13_vgg8",
                 "ResNet50_MobileNetV2", "resnet32x4_ShuffleV2"):
        for method in ("kd", "dkd", "dist", "ctkd", "normkd"):
            assert f"cifar100/{method}/{pair}.yaml" in names
    assert "imagenet/kd/resnet34_resnet18.yaml" in names


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs" / "experiments")))
def test_fit_config_resolves(path, capsys):
    config = resolve(["--config", str(path)], capsys)
    init_args = config["model"]["init_args"]
    assert config["data"]["class_path"].startswith("lightning_kd.data.")
    assert config["trainer"]["max_epochs"] > 0
    optimizer = init_args["optimizer"]
    assert optimizer == DEFAULT_OPTIMIZER or optimizer["class_path"] == "torch.optim.SGD"
    assert not restates_default_optimizer(optimizer), f"{path.name} {RESTATED_MESSAGE}"
    student = init_args["student"]
    assert isinstance(student, str), "model names must stay names, not become classes of the same name"
    teacher = init_args["teacher"]
    assert isinstance(teacher, str) or path.parts[-2] == "supervised" or "virtual" in path.name \
        or "peers" in init_args or (path.parts[-2] == "multiteacher" and all(isinstance(t, str) for t in teacher))
    if path.parts[-2] == "kd_function_matching":
        assert config["trainer"]["max_epochs"] >= 1200 and init_args["mix"] in ("mixup", "cutmix")
        assert init_args["lr_scheduler"]["init_args"]["T_max"] == config["trainer"]["max_epochs"]
    elif path.parts[-2] == "datafree":  # DFAD's recipe: 500 epochs of 50 steps of 256 generated images
        assert config["trainer"]["max_epochs"] == 500 and config["data"]["init_args"]["batch_size"] == 256
        assert init_args["lr_scheduler"]["init_args"]["milestones"] == [100, 200]
        assert init_args["optimizer"]["init_args"]["lr"] == 0.1
    elif path.parts[-3] == "cifar100":
        data_args = config["data"]["init_args"]
        data_args = data_args["datamodule"]["init_args"] if "datamodule" in data_args else data_args
        # the methods with RepDistiller's 30 initialisation epochs run them before the 240 of the recipe
        init = 30 if path.parts[-2] in ("ab", "fsp", "ft") else 0
        assert init_args.get("init_epochs", 0) == init
        assert config["trainer"]["max_epochs"] == 240 + init and data_args["batch_size"] == 64
        assert init_args["lr_scheduler"]["init_args"]["milestones"] == [150 + init, 180 + init, 210 + init]
        official_lr = 0.025 if path.parts[-2] == "mlkd" else 0.05  # MLKD's official configs (ours/res32x4_res8x4.yaml)
        small = student in ("MobileNetV2", "ShuffleV2")
        assert build_optimizer(optimizer).defaults["lr"] == (0.01 if small else official_lr)


@pytest.mark.parametrize("path", RUNNER_FILES, ids=lambda p: str(p.relative_to(ROOT / "configs" / "experiments")))
def test_experiment_file_runs_resolve(path, capsys):
    from lightning_kd.runner import run_arguments

    runs = run_arguments(yaml.safe_load(path.read_text()), teacher_weights="teacher.pt")
    assert len(runs) > 1 and all(name != "teacher" for name, _ in runs[1:])
    for name, args in runs:
        config = resolve(args, capsys)
        assert config["model"]["init_args"]["student"], name
        assert not restates_default_optimizer(config["model"]["init_args"]["optimizer"]), f"{name} {RESTATED_MESSAGE}"


def _optimizer_values(node, config: Path):
    """Every optimizer set in a YAML tree (keys ``optimizer`` / ``model.optimizer``), config file paths loaded."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("optimizer", "model.optimizer"):
                if isinstance(value, str) and value.endswith(".yaml"):
                    for base in (config.parent, ROOT):
                        if (base / value).is_file():
                            value = yaml.safe_load((base / value).read_text())
                            break
                if isinstance(value, dict) and "class_path" in value:
                    yield value
            else:
                yield from _optimizer_values(value, config)
    elif isinstance(node, list):
        for value in node:
            yield from _optimizer_values(value, config)


def test_the_default_optimizer_is_recognised():
    assert restates_default_optimizer({"class_path": "torch.optim.SGD",
                                       "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4}})
    assert restates_default_optimizer({"class_path": "torch.optim.SGD", "init_args": {
        "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4, "foreach": True, "fused": None}})
    assert not restates_default_optimizer(DEFAULT_OPTIMIZER)
    assert not restates_default_optimizer({"class_path": "torch.optim.SGD",
                                           "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4}})
    assert not restates_default_optimizer({"class_path": "torch.optim.SGD", "init_args": {
        "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4, "nesterov": True}})
    assert not restates_default_optimizer({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_no_config_sets_the_default_optimizer(path):
    """Fragments under configs/optimizer/ and every optimizer named or spelled out in any config file."""
    tree = yaml.safe_load(path.read_text())
    found = list(_optimizer_values(tree, path))
    if path.parent.name == "optimizer":
        found.append(tree)
    for optimizer in found:
        assert not restates_default_optimizer(optimizer), f"{path.relative_to(ROOT)} {RESTATED_MESSAGE}"
