"""The distillation term: one loss of a distillation method as a small module.

A term declares the student and teacher layers it reads (module names, see :mod:`lightning_kd.features`), builds its
trainable parts from their shapes, and returns its weighted losses by name. A method is the teacher–student base plus
its terms; :class:`~lightning_kd.methods.Distiller` takes any mapping of terms.

>>> import torch
>>> from lightning_kd.terms import KDTerm
>>> term = KDTerm(temperature=4.0, weight=0.9)
>>> spec = term.spec()
>>> spec["class_path"], spec["init_args"]["temperature"], spec["init_args"]["weight"]
('lightning_kd.terms.logit.KDTerm', 4.0, 0.9)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_kd.losses import standardize_logits

if TYPE_CHECKING:
    from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput

SPEC_TYPES = (bool, int, float, str, type(None))


def _plain(value: Any, where: str) -> Any:
    """``value`` as YAML/JSON-able primitives (what a checkpoint loaded with ``weights_only=True`` may hold)."""
    if isinstance(value, SPEC_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _plain(item, where) for key, item in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}; a term's arguments must be numbers, strings, booleans, None "
                    "or lists/dicts of them, so that checkpoints can store the term as a spec (no pickled objects)")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up ``min((epoch + 1) / warmup_epochs, 1)`` of a 0-based ``epoch``, i.e. epochs counted from 1 as in
    the DKD reference code; 1 when ``warmup_epochs`` is 0."""
    return min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


class DistillationTerm(nn.Module):
    """One distillation loss: the layers it reads, its trainable parts, and its weighted losses by name.

    Subclasses implement :meth:`losses` (unweighted losses by name) and, when they read intermediate features,
    :meth:`layers` (which modules to hook) and, when they have parts sized by those features, :meth:`build`
    (with ``needs_shapes = True``). The host module hooks the union of all its terms' layers once per forward pass
    and hands every term the same :class:`~lightning_kd.methods.base.ModelOutput`; a term reads its features by
    name (:meth:`student_features`).

    Args:
        weight: factor of every loss the term returns.
        warmup_epochs: linear ramp ``min(epoch / warmup_epochs, 1)`` of the term's losses, epochs counted from 1
            (as in the DKD reference code); 0: none.
        standardize: z-score student and teacher logits over classes before the loss (logit standardization, Sun et
            al., CVPR 2024); ``None``: the host module's ``standardize``. Only terms that read logits use it.

    The arguments a term was built with (defaults included) are recorded (:meth:`spec`), so checkpoints store a term as
    ``{"class_path": ..., "init_args": ...}`` and :func:`term_from_spec` rebuilds it.
    """

    #: whether :meth:`build` must run (from the shapes of the hooked features) before the first loss
    needs_shapes: bool = False
    #: whether the term reads the teacher's outputs
    requires_teacher: bool = True
    #: whether the term reads logits (and so takes ``standardize``)
    reads_logits: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_init_args" not in self.__dict__:  # the outermost __init__ records what the user passed
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                given = {name: value for name, value in list(bound.arguments.items())[1:]
                         if signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                    inspect.Parameter.VAR_KEYWORD)}
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound.arguments:
                        given.update(bound.arguments[name])
                object.__setattr__(self, "_init_args", given)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def __init__(self, *, weight: float = 1.0, warmup_epochs: int = 0, standardize: bool | None = None):
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be 0 (no ramp) or a positive number of epochs")
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self.built = not self.needs_shapes
        self._host: weakref.ref | None = None

    # ------------------------------------------------------------------------------------------------ spec
    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: what rebuilds this term (see :func:`term_from_spec`)."""
        cls = type(self)
        init_args = {name: _plain(value, f"{cls.__name__}'s argument {name!r}")
                     for name, value in self.__dict__.get("_init_args", {}).items()}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

    # ------------------------------------------------------------------------------------------------ host
    def bind(self, host: DistillationModule) -> None:
        """Attach the term to its host module: resolve its layers on the host's student and teacher. Called once,
        when the host adds the term."""
        self._host = weakref.ref(host)
        if self.requires_teacher and host.teacher is None:
            raise ValueError(f"{type(self).__name__} distils from a teacher, but {type(host).__name__} has none: pass "
                             "teacher=<nn.Module or model name>")
        if self.standardize is None:
            self.standardize = bool(host.hparams.get("standardize", False))
        student_layers, teacher_layers = self.layers(host.student, host.teacher)
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)

    @property
    def host(self) -> DistillationModule:
        host = None if self._host is None else self._host()
        if host is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a distillation module: add it with "
                               "module.add_term(name, term) or pass it in Distiller(terms={...})")
        return host

    @property
    def epoch(self) -> int:
        """The host's current epoch (0-based)."""
        return self.host.current_epoch

    def ramp(self) -> float:
        """``min((epoch + 1) / warmup_epochs, 1)``; 1 without warm-up (then no host is needed)."""
        return warmup_factor(self.epoch, self.warmup_epochs) if self.warmup_epochs else 1.0

    # ---------------------------------------------------------------------------------------------- layers
    def layers(self, student: nn.Module, teacher: nn.Module | None) -> tuple[Sequence[str], Sequence[str]]:
        """Module names of the student and teacher layers the term reads (none by default: logits only)."""
        return [], []

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Build the trainable parts from the shapes of :attr:`student_layers` and :attr:`teacher_layers` (batch
        dimension first), in their order."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_shapes but does not define build")

    def _build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.build(student_shapes, teacher_shapes)
        self.built = True

    def student_features(self, student_out: ModelOutput) -> list[Tensor]:
        """The term's student features, in the order of :attr:`student_layers`."""
        return [student_out.features[name] for name in self.student_layers]

    def teacher_features(self, teacher_out: ModelOutput) -> list[Tensor]:
        """The term's teacher features, in the order of :attr:`teacher_layers`."""
        return [teacher_out.features[name] for name in self.teacher_layers]

    def logits(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> tuple[Tensor, Tensor | None]:
        """Student and teacher logits as the loss should see them (standardized when ``standardize``)."""
        student, teacher = student_out.logits, None if teacher_out is None else teacher_out.logits
        if self.standardize:
            return standardize_logits(student), None if teacher is None else standardize_logits(teacher)
        return student, teacher

    # ---------------------------------------------------------------------------------------------- losses
    def losses(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        """The term's unweighted losses by name."""
        raise NotImplementedError(f"{type(self).__name__} does not define losses")

    def forward(self, batch: Batch, student_out: ModelOutput, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        """:meth:`losses`, each × ``weight`` × the warm-up ramp."""
        if not self.built:
            raise RuntimeError(f"{type(self).__name__}'s trainable parts are not built: pass input_shape=(C, H, W) to "
                               "the module or train through a Trainer (setup builds them from the data)")
        factor = self.weight * self.ramp()
        return {name: factor * value for name, value in self.losses(batch, student_out, teacher_out).items()}

    # -------------------------------------------------------------------------------------- module hooks
    def setup(self, stage: str) -> None:
        """Called from the host's ``setup`` (after its own), e.g. to read the training data."""

    def on_train_start(self) -> None:
        """Called when training starts (the training data loader exists then)."""

    def on_train_batch_end(self) -> None:
        """Called after each training batch (after the optimizer step)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Called when the host loads a checkpoint, before its weights load."""

    def extra_repr(self) -> str:
        layers = [f"student_layers={self.student_layers}" if self.student_layers else "",
                  f"teacher_layers={self.teacher_layers}" if self.teacher_layers else ""]
        return ", ".join([f"weight={self.weight}", *filter(None, layers)])


def term_from_spec(spec: DistillationTerm | dict[str, Any], name: str = "term") -> DistillationTerm:
    """A term from ``{"class_path": "module.Class", "init_args": {...}}`` (``class_path`` may be a class name
    exported by :mod:`lightning_kd.terms`); a term passes through. Only :class:`DistillationTerm` subclasses are
    built."""
    if isinstance(spec, DistillationTerm):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError(f"term {name!r} is a {type(spec).__name__}: pass a DistillationTerm or a spec "
                        "{'class_path': 'lightning_kd.terms.KDTerm', 'init_args': {...}}")
    class_path = str(spec["class_path"])
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_kd.terms"), class_name)
    except (ImportError, AttributeError) as error:
        from lightning_kd import terms

        raise ValueError(f"term {name!r}: cannot find the class {class_path!r} ({error}). Terms of the library: "
                         f"{', '.join(terms.__all__)}") from None
    if not (isinstance(cls, type) and issubclass(cls, DistillationTerm)):
        raise TypeError(f"term {name!r}: {class_path!r} is not a DistillationTerm subclass")
    return cls(**dict(spec.get("init_args") or {}))
