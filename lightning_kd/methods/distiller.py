from __future__ import annotations

from typing import Any

from torch import nn

from lightning_kd.methods.base import DistillationModule
from lightning_kd.terms import DistillationTerm, term_from_spec


class Distiller(DistillationModule):
    """Any distillation terms combined in one run: the teacher–student base (cross-entropy, frozen teacher, metrics,
    optimizer) plus a mapping of named :class:`~lightning_kd.terms.DistillationTerm`.

    Each term has its own arguments, its own ``weight`` (and ``warmup_epochs``, ``standardize``), and is logged as
    ``train/loss_<term>_<loss>`` (``train/loss_<term>`` when the loss has the term's name). The layers of all terms
    are hooked once per forward pass, each read by name; parts sized by features are built from one dry run (see
    ``input_shape`` in :class:`~lightning_kd.methods.DistillationModule`).

    >>> from lightning_kd.terms import ATTerm, KDTerm
    >>> model = Distiller("resnet8", "resnet20", num_classes=100, ce_weight=1.0,
    ...                   terms={"kd": KDTerm(temperature=4.0, weight=0.9), "at": ATTerm(weight=1000.0)})
    >>> model.student_layers
    ['layer1', 'layer2', 'layer3']
    >>> sorted(model.hparams.terms)
    ['at', 'kd']

    From YAML (``lightning-kd fit --model Distiller ...``)::

        model:
          class_path: Distiller
          init_args:
            student: resnet8x4
            teacher: resnet32x4
            terms:
              crd: {class_path: CRDTerm, init_args: {weight: 0.8}}
              kd: {class_path: KDTerm, init_args: {temperature: 4.0, weight: 1.0}}

    Checkpoints store each term as its spec (``{"class_path": ..., "init_args": ...}``), never as a pickled object:
    ``Distiller.load_from_checkpoint(path)`` and ``lightning-kd test --ckpt_path`` rebuild the terms from the file
    (loaded with ``weights_only=True``).

    Args:
        terms: the terms by name (a Python identifier each): :class:`~lightning_kd.terms.DistillationTerm` instances or
            their specs.
        *args, **kwargs: see :class:`~lightning_kd.methods.DistillationModule`.
    """

    requires_teacher = False  # each term says whether it needs one
    prefix_term_names = True
    hparams_ignore = ("terms",)

    def __init__(self, student: str | nn.Module, teacher: str | nn.Module | None = None, *,
                 terms: dict[str, DistillationTerm], **kwargs):
        super().__init__(student, teacher, **kwargs)
        if not isinstance(terms, dict) or not terms:
            raise ValueError("Distiller needs at least one term: terms={'kd': KDTerm(...), ...} (or specs "
                             "{'kd': {'class_path': 'KDTerm', 'init_args': {...}}})")
        for name, term in terms.items():
            self.add_term(name, term_from_spec(term, name))
        self.hparams["terms"] = self.term_specs()
        self._hparams_initial["terms"] = self.term_specs()

    def term_specs(self) -> dict[str, dict[str, Any]]:
        """Each term's spec by name: what a checkpoint stores to rebuild them."""
        return {name: term.spec() for name, term in self.terms.items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint.setdefault("hyper_parameters", {})["terms"] = self.term_specs()
