"""A pre-training ("init") phase before ordinary distillation, inside one ``Trainer.fit``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.methods.base import Batch, DistillationModule
from lightning_kd.terms.staged import StagedTerm


class InitPhaseDistillation(DistillationModule):
    """Base of the methods that first train some parts with a loss of their own (FSP, AB, FT): during the first
    ``init_epochs`` epochs only :meth:`init_modules` are optimized, on :meth:`init_losses` alone (no
    cross-entropy); from then on training is that of :class:`DistillationModule` (cross-entropy plus
    :meth:`distillation_losses`), with :meth:`frozen_after_init` left out of the optimizer, without gradients and in
    eval mode.

    By default all three come from the method's :class:`~lightning_kd.terms.staged.StagedTerm` s (:meth:`add_term`):
    the init phase trains their :meth:`~lightning_kd.terms.staged.StagedTerm.init_parts` (and the student when one
    of them trains it) on their :meth:`~lightning_kd.terms.staged.StagedTerm.init_losses`, and fixes their
    :meth:`~lightning_kd.terms.staged.StagedTerm.frozen_parts` afterwards; the main phase sums every term's
    :meth:`~lightning_kd.terms.DistillationTerm.losses`, as in any method. A subclass may override the three instead.
    With ``mix``, init-phase batches are mixed as well (the same images for teacher and student).

    How it runs in one ``Trainer.fit``: :meth:`configure_optimizers` builds the optimizer of the current phase,
    :meth:`configure_init_optimizer` (by default RepDistiller's init optimizer: SGD with ``init_lr``, momentum 0.9,
    weight decay 5e-4, constant rate) in the init phase, the method's ``optimizer``/``lr_scheduler`` afterwards.
    When the last init epoch ends (``on_train_epoch_end``) the phase flips and the strategy rebuilds the optimizers
    (``strategy.setup_optimizers``); Lightning's own loop then steps the new optimizer, so gradient clipping,
    accumulation, mixed precision, checkpoint callbacks and learning-rate monitors behave as in any method.
    Init-phase losses are logged as ``train/init_loss`` and ``train/init_loss_<name>``.

    Checkpoints: the phase is saved in the checkpoint (``"init_phase_done"``) and restored by
    :meth:`on_load_checkpoint`, which Lightning calls before it builds the optimizers of a resumed fit, so the
    saved optimizer state always loads into the optimizer of its own phase. A checkpoint written before the switch
    (at the validation of the last init epoch, or by a callback whose epoch-end hook runs before the module's)
    resumes in the init phase and switches when that epoch's end hooks rerun or, at the latest, at the start of the
    next epoch, to the same optimizer and schedule as an uninterrupted fit. ``load_from_checkpoint`` restores the
    phase and the frozen parts likewise.

    Deviations from the reference (RepDistiller ``helper/pretrain.py``, which runs the init epochs in a loop of
    their own before the 240 ordinary ones):

    * The learning-rate schedule counts trainer epochs, init epochs included: at the switch the new epoch-wise
      scheduler is advanced by the epochs already run, so ``max_epochs: 240`` with milestones 150/180/210 trains 30
      init and 210 ordinary epochs, decaying at the same trainer epochs as the other methods. The reference's
      exact schedule is ``max_epochs: 270`` with milestones 180/210/240. Step-wise and plateau schedulers are not
      advanced (a plateau scheduler takes its first step at the end of the last init epoch).
    * The init phase sees the same training batches (and augmentation) as the rest of the fit, and validation runs
      during it as in every epoch (the reference does not validate in its init loop).
    * The switch rebuilds the optimizers with ``strategy.setup_optimizers``, as the single-device and DDP
      strategies allow (strategies that restore checkpoints after setting up, such as DeepSpeed, are not
      supported). Under DDP the parts idle in a phase (the student during FT's init phase, the classifier during
      AB's and FSP's) get no gradients: use ``strategy="ddp_find_unused_parameters_true"``.

    Args:
        init_epochs: epochs of the init phase (at least 1).
        init_lr: learning rate of the init optimizer.
    """

    #: whether the init phase is over (saved in checkpoints)
    init_phase_done: bool = False

    def __init__(self, *args, init_epochs: int, init_lr: float, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 1:
            raise ValueError(f"{type(self).__name__} needs an init phase of at least one epoch, got init_epochs="
                             f"{init_epochs!r}: pass a positive integer (the reference uses 30)")
        if not init_lr > 0:
            raise ValueError(f"init_lr must be positive, got {init_lr}")
        self.init_phase_done = False

    # ------------------------------------------------------------------------------------ what a method defines
    def staged_terms(self) -> dict[str, StagedTerm]:
        """The method's terms that have an init phase, by name."""
        return {name: term for name, term in self.terms.items() if isinstance(term, StagedTerm)}

    def _require_staged_terms(self, hook: str) -> list[StagedTerm]:
        terms = list(self.staged_terms().values())
        if not terms:
            raise NotImplementedError(f"{type(self).__name__} has no term with an init phase (a "
                                      f"lightning_kd.terms.staged.StagedTerm): add one or define {hook}")
        return terms

    def init_modules(self) -> list[nn.Module]:
        """The modules optimized during the init phase: the staged terms' init parts, and the student when one of
        them trains it."""
        terms = self._require_staged_terms("init_modules")
        student = [self.student] if any(term.init_trains_student for term in terms) else []
        return student + [part for term in terms for part in term.init_parts()]

    def frozen_after_init(self) -> list[nn.Module]:
        """The modules fixed once the init phase is over: the staged terms' frozen parts."""
        return [part for term in self.staged_terms().values() for part in term.frozen_parts()]

    def init_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The weighted init-phase losses by name: every staged term's, from one teacher forward pass and, when a
        term trains the student, one student forward pass."""
        terms = self.staged_terms()
        self._require_staged_terms("init_losses")
        teacher_out = None if self.teacher is None else self.forward_teacher(batch)
        student_out = (self.forward_student(batch) if any(term.init_trains_student for term in terms.values())
                       else None)
        losses: dict[str, Tensor] = {}
        for term_name, term in terms.items():
            for loss_name, value in term.init_forward(batch, student_out, teacher_out).items():
                losses[self.loss_name(term_name, loss_name)] = value
        return losses

    def configure_init_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The init-phase optimizer: SGD with ``init_lr``, momentum 0.9, weight decay 5e-4, as RepDistiller's."""
        return torch.optim.SGD(params, lr=self.hparams.init_lr, momentum=0.9, weight_decay=5e-4)

    # ------------------------------------------------------------------------------------------------- phases
    def _frozen(self) -> list[nn.Module]:
        return [module for module in self.frozen_after_init() if module is not None]

    def _apply_phase(self) -> None:
        for module in self._frozen():
            module.requires_grad_(not self.init_phase_done)
            if self.init_phase_done:
                module.eval()
                for parameter in module.parameters():
                    parameter.grad = None

    def train(self, mode: bool = True) -> InitPhaseDistillation:
        super().train(mode)
        if self.init_phase_done:
            for module in self._frozen():
                module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer of the current phase sees: the parameters of :meth:`init_modules` during the init
        phase, afterwards those of the base without :meth:`frozen_after_init`."""
        if not self.init_phase_done:
            modules = [module for module in self.init_modules() if module is not None]
            unique = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
            teacher = set() if self.teacher is None else {id(p) for p in self.teacher.parameters()}
            return [p for key, p in unique.items() if key not in teacher]
        frozen = {id(p) for module in self._frozen() for p in module.parameters()}
        return [p for p in super().trainable_parameters() if id(p) not in frozen]

    def configure_optimizers(self) -> Any:
        self._apply_phase()
        if self.init_phase_done:
            return super().configure_optimizers()
        return self.configure_init_optimizer(self.trainable_parameters())

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.init_phase_done and self.current_epoch + 1 >= self.hparams.init_epochs:
            self.finish_init_phase(epochs_done=self.current_epoch + 1)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # a fit resumed from a checkpoint written before the last init epoch's end hook
        if not self.init_phase_done and self.current_epoch >= self.hparams.init_epochs:
            self.finish_init_phase(epochs_done=self.current_epoch)

    def finish_init_phase(self, epochs_done: int) -> None:
        """End the init phase: fix :meth:`frozen_after_init`, build the ordinary optimizer and scheduler, and
        advance an epoch-wise scheduler by the ``epochs_done`` epochs already trained."""
        self.init_phase_done = True
        self._apply_phase()
        self.trainer.strategy.setup_optimizers(self.trainer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for config in self.trainer.lr_scheduler_configs:
                if config.interval == "epoch" and not config.reduce_on_plateau:
                    for _ in range(epochs_done):
                        config.scheduler.step()

    # -------------------------------------------------------------------------------------------------- steps
    def _training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.init_phase_done:
            return super()._training_step(batch, batch_idx)
        self._check_targets(batch.target, batch_idx)
        return self.total_loss(self.init_losses(batch), batch_idx, log_as="train/init_loss", name_prefix="init_")

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["init_phase_done"] = self.init_phase_done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.init_phase_done = bool(checkpoint.get("init_phase_done", False))
        self._apply_phase()
