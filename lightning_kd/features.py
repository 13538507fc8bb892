"""Intermediate outputs of a model, captured by module name with forward hooks.

A layer is named as in ``model.named_modules()``; its *output* is captured, or its first positional *input* when
the name ends in ``":input"`` (``"fc:input"`` is the pre-logit embedding of a model whose classifier is ``fc``).
Default names come from the model's feature interface:

* registered models (:class:`~lightning_kd.models.base.ZooModel`): ``stage_names()`` (stem first),
  ``stage_names(preact=True)``, ``embedding_name``, ``get_classifier()``;
* timm models: the modules of ``feature_info`` (stem first) and the input of ``get_classifier()``;
* any other model: explicit module names.

>>> import torch
>>> from lightning_kd.models import create_model
>>> model = create_model("resnet8x4", num_classes=100)
>>> layers = stage_names(model)[1:] + [embedding_name(model)]
>>> layers
['layer1', 'layer2', 'layer3', 'avgpool']
>>> with capture_features(model, layers) as features:
...     logits = model(torch.zeros(2, 3, 32, 32))
>>> {name: tuple(f.shape) for name, f in features.items()}["avgpool"]
(2, 256)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.data.base import first_input
from lightning_kd.models.base import ZooModel

INPUT_SUFFIX = ":input"


# ------------------------------------------------------------------------------------------- default layers
def _timm_feature_info(model: nn.Module) -> list[dict] | None:
    info = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):
        info = info.get_dicts()
    if isinstance(info, (list, tuple)) and info and all(isinstance(i, dict) and "module" in i for i in info):
        return list(info)
    return None


def _no_interface(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"{type(model).__name__} has no feature interface to take its {what} from (neither a registered "
                      "model nor a timm model): pass the module names explicitly (student_layers=/teacher_layers=), "
                      f"e.g. among its top-level modules {_top_level(model)}")


def stage_names(model: nn.Module, preact: bool = False) -> list[str]:
    """Names of the modules whose outputs are the model's stage features, stem first.

    A registered model's ``stage_names(preact)``; a timm model's ``feature_info`` modules (timm has no
    pre-activation features, so ``preact=True`` is an error there).
    """
    if isinstance(model, ZooModel):
        names = model.stage_names(preact=preact)
        if not names:
            raise ValueError(f"{type(model).__name__} lists no {'pre-activation ' if preact else ''}stage features: "
                             "pass the module names explicitly")
        return names
    info = _timm_feature_info(model)
    if info is not None:
        if preact:
            raise ValueError(f"timm's {type(model).__name__} has no pre-activation feature interface: pass the "
                             "module names explicitly")
        return [entry["module"] for entry in info]
    raise _no_interface(model, "stages")


def classifier_name(model: nn.Module) -> str:
    """Name of the model's final linear classifier (``ZooModel.classifier_name``, or timm's ``get_classifier()``)."""
    if isinstance(model, ZooModel):
        return model.classifier_name
    if _timm_feature_info(model) is not None and callable(getattr(model, "get_classifier", None)):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier and name and not isinstance(module, nn.Identity):
                return name
    raise _no_interface(model, "classifier")


def embedding_name(model: nn.Module) -> str:
    """The layer whose output is the pooled ``(N, C)`` embedding fed to the classifier.

    A registered model's ``embedding_name``; for a timm model the input of its classifier (``"fc:input"``).
    """
    if isinstance(model, ZooModel):
        return model.embedding_name
    return classifier_name(model) + INPUT_SUFFIX


# ----------------------------------------------------------------------------------------------- checking
def _top_level(model: nn.Module, limit: int = 12) -> str:
    names = [name for name, _ in model.named_children()]
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def _module_name(layer: str) -> str:
    return layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer


def check_layers(model: nn.Module, layers: str | Sequence[str], role: str = "model") -> list[str]:
    """``layers`` as a list of names, after checking that ``model`` has each of them.

    A wrong name raises ``ValueError`` naming the closest module names, the model's stage modules (when it has
    a feature interface) and its top-level modules.
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, str):
            raise TypeError(f"layer names must be strings, got {layer!r}")
        if _module_name(layer) in modules and _module_name(layer):
            continue
        try:
            stages = stage_names(model)
        except ValueError:
            stages = []
        main = list(dict.fromkeys([*stages, *(name for name, _ in model.named_children())]))
        close = (difflib.get_close_matches(_module_name(layer), main, n=3, cutoff=0.6)
                 or difflib.get_close_matches(_module_name(layer), [n for n in modules if n], n=3, cutoff=0.6))
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        stages = f" Its stage modules: {', '.join(stages)};" if stages else ""
        raise ValueError(f"the {role} ({type(model).__name__}) has no module {_module_name(layer)!r}.{hint}{stages} "
                         f"its top-level modules: {_top_level(model)}. Names are those of named_modules(); "
                         f"append {INPUT_SUFFIX!r} to capture a module's input instead of its output")
    return layers


# ---------------------------------------------------------------------------------------------- capturing
def preactivation_layers(model: nn.Module, role: str, method: str, hint: str = "") -> list[str]:
    """The layers holding the model's stage features before their final ReLU, stem excluded.

    A registered model's ``stage_names(preact=True)``; otherwise (timm models, registered models without a
    pre-activation list) the input (``name:input``) of the last ``nn.ReLU`` registered in each stage module of
    ``stage_names()``, e.g. ``layer1.1.act2:input`` for timm's ResNets. A stage without a ReLU is an error naming
    the ``<role>_layers`` option (and ``hint``, further options to pass).

    The input of an in-place activation is copied by :func:`capture_features` before the activation overwrites it.
    """
    try:
        return stage_names(model, preact=True)[1:]
    except ValueError:
        pass
    layers = []
    for stage in stage_names(model)[1:]:
        relus = [name for name, module in model.get_submodule(stage).named_modules() if isinstance(module, nn.ReLU)]
        if not relus:
            raise ValueError(f"{method} distils the stage features before their final ReLU, but stage {stage!r} of "
                             f"the {role} ({type(model).__name__}) has no nn.ReLU module to take them from: pass "
                             f"{role}_layers=[...] naming the pre-activation modules (or 'module:input' of each "
                             "stage's last activation)" + hint)
        layers.append(f"{stage}.{relus[-1]}" + INPUT_SUFFIX if relus[-1] else stage + INPUT_SUFFIX)
    return layers


@contextmanager
def capture_features(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Hook ``layers`` of ``model`` for the duration of the block; yields a dict filled, in the order of
    ``layers``, when the block ends.

    Each layer's module must run exactly once in the block (a module reused within one forward pass, such as a
    shared ReLU, is ambiguous: hook its parent instead). The hooks are removed on exit, also after an error.
    Captured tensors are the modules' own outputs (not copies), with autograd history when the forward pass
    records it; no hooks are registered when ``layers`` is empty.
    """
    features: dict[str, Tensor] = {}
    if not layers:
        yield features
        return
    captured: dict[str, list[Any]] = {layer: [] for layer in layers}
    handles = []

    def output_hook(layer: str):
        return lambda module, args, output: captured[layer].append(output)

    def input_hook(layer: str):
        def hook(module: nn.Module, args: tuple) -> None:
            value = args[0] if args else None
            # an in-place module (e.g. ReLU(inplace=True)) would overwrite the captured input with its output
            if getattr(module, "inplace", False) and isinstance(value, Tensor):
                value = value.clone()
            captured[layer].append(value)
        return hook

    try:
        for layer in layers:
            try:
                module = model.get_submodule(_module_name(layer))
            except AttributeError:
                check_layers(model, [layer])
                raise
            if layer.endswith(INPUT_SUFFIX):
                handles.append(module.register_forward_pre_hook(input_hook(layer)))
            else:
                handles.append(module.register_forward_hook(output_hook(layer)))
        yield features
    finally:
        for handle in handles:
            handle.remove()
    for layer, values in captured.items():
        if len(values) != 1:
            problem = "did not run" if not values else f"ran {len(values)} times"
            raise ValueError(f"module {_module_name(layer)!r} of {type(model).__name__} {problem} in the forward pass; "
                             "hook a module that runs exactly once (e.g. its parent block)")
        features[layer] = values[0]


# ------------------------------------------------------------------------------------------ shape inference
def feature_shapes(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> dict[str, torch.Size]:
    """Shapes of ``layers`` for a batch of two zero inputs of ``input_shape`` (one sample, without the batch
    dimension), from a forward pass without autograd in eval mode; every module's train/eval mode is restored.
    """
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), capture_features(model, layers) as features:
            model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    return {name: feature.shape for name, feature in features.items()}


def infer_input_shape(trainer: Any, stage: str = "fit") -> tuple[int, ...]:
    """Shape of one input sample (without the batch dimension) of the data the ``trainer`` runs ``stage`` on:
    item 0 of the data loader's data set when it has one, else the first batch."""
    loop = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop",
            "predict": "predict_loop"}.get(stage, "fit_loop")
    source = getattr(getattr(trainer, loop, None), "_data_source", None)
    loader = None
    if source is not None and getattr(source, "instance", None) is not None and source.is_defined():
        loader = source.dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    sample_input = None
    if loader is not None:
        dataset = getattr(loader, "dataset", None)
        try:
            sample_input = first_input(dataset[0])
        except (TypeError, IndexError, KeyError, NotImplementedError):
            batch = first_input(next(iter(loader)))
            sample_input = None if batch is None else batch[0]
    if sample_input is None:
        raise ValueError(f"could not read an input sample from the {stage} data to infer the feature shapes: pass "
                         "input_shape=(channels, height, width) of one input to the method")
    return tuple(int(size) for size in sample_input.shape)


__all__ = ["INPUT_SUFFIX", "capture_features", "check_layers", "classifier_name", "embedding_name",
           "feature_shapes", "infer_input_shape", "stage_names"]


# ------------------------------------------------------------------------------------------- pairing layers
def paired_stages(student: Sequence[str] | None, teacher: Sequence[str] | None, default_student: list[str],
                  default_teacher: list[str], method: str) -> tuple[list[str], list[str]]:
    """Student and teacher layers paired in order. Defaults of different lengths keep the deepest stages of the
    longer list (mdistiller's ``_align_list``); explicit lists must be equally long."""
    if student is None and teacher is None:
        count = min(len(default_student), len(default_teacher))
        return default_student[len(default_student) - count:], default_teacher[len(default_teacher) - count:]
    student = list(student) if student is not None else default_student
    teacher = list(teacher) if teacher is not None else default_teacher
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{method} pairs student and teacher layers in order, but got {len(student)} student layers "
                         f"({', '.join(student)}) and {len(teacher)} teacher layers ({', '.join(teacher)}): pass "
                         "student_layers and teacher_layers of equal length")
    return student, teacher


def stage_pairs(student: nn.Module, teacher: nn.Module, student_layers: Sequence[str] | None,
                teacher_layers: Sequence[str] | None, method: str) -> tuple[list[str], list[str]]:
    """Layers paired in order: the given names, by default each model's stages after the stem; the two lists
    must be equally long."""
    student_layers = list(student_layers or stage_names(student)[1:])
    teacher_layers = list(teacher_layers or stage_names(teacher)[1:])
    if len(student_layers) != len(teacher_layers):
        raise ValueError(f"{method} pairs student and teacher layers in order, but got "
                         f"{len(student_layers)} student layers ({', '.join(student_layers)}) and "
                         f"{len(teacher_layers)} teacher layers ({', '.join(teacher_layers)}): pass "
                         "student_layers and teacher_layers of equal length")
    return student_layers, teacher_layers


def hint_stage(model: nn.Module, index: int) -> str:
    """The stage ``index`` of the model's stage list (stem = 0), or its last stage when it has fewer."""
    stages = stage_names(model)
    return stages[min(index, len(stages) - 1)]
