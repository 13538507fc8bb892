from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_kd.data.synthetic import DataFreeDataModule, batch_size_of
from lightning_kd.losses.datafree import bn_statistics_loss
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn.generator import ImageGenerator
from lightning_kd.terms.datafree import DISCREPANCIES, DataFreeKDTerm

GENERATORS = ("dfad", "noise")


class DataFreeKD(DistillationModule):
    """Data-free adversarial distillation with a BatchNorm-statistics prior: DFAD (Fang et al., "Data-Free Adversarial
    Distillation", 2019) with the teacher's BatchNorm statistics as the generator's prior, as in Choi et al.,
    "Data-Free Network Quantization With Adversarial Knowledge Distillation" (CVPR Workshops 2020), the prior in the
    form of DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020).

    A generator ``G`` (:class:`~lightning_kd.nn.generator.ImageGenerator`) turns latent vectors ``z ~ N(0, I)`` into
    inputs; the student ``S`` learns to match the frozen teacher ``T`` on them and ``G`` learns to make them hard:

    * student, ``student_steps`` times per training step on fresh ``G(z)``: ``min_S D(S(G(z)), T(G(z)))``;
    * generator, once per training step: ``min_G −adversarial_weight · D(S(G(z)), T(G(z))) + bn_weight ·
      Σ_l ‖μ_l − running_mean_l‖₂ + ‖σ²_l − running_var_l‖₂``, the prior over the teacher's BatchNorm layers ``l``
      whose input batch statistics ``μ_l, σ²_l`` on ``G(z)`` are read by forward hooks (the teacher stays frozen and
      in eval mode) (:func:`~lightning_kd.losses.datafree.bn_statistics_loss`);

    ``D`` is ``discrepancy="l1"``, DFAD's mean absolute logit difference over batch and classes
    (:func:`~lightning_kd.losses.datafree.logit_l1_discrepancy`), or ``"kl"``, ``T² · KL(p_t ‖ p_s)`` at
    ``temperature``, summed over classes and averaged over the batch (:func:`~lightning_kd.losses.kd_loss`).
    There are no labels, hence no cross-entropy. ``generator="noise"`` is the baseline that isolates what the
    generator adds: the same student trained on Gaussian noise ``N(0, 1)`` of the input shape (the statistics of
    normalised inputs), with the same ``D`` and the same number of student steps, and no generator.

    Defaults: DFAD's official CIFAR code (``DFAD_cifar.py``): L1 discrepancy, 5 student steps per generator step,
    latent size 256, generator width 64, generator Adam at lr 1e-3 (betas 0.9, 0.999); the student's optimizer is the
    configured one (DFAD: SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256, 50 steps an epoch for 500 epochs:
    set them in the config and in :class:`~lightning_kd.data.synthetic.DataFreeDataModule`). Adversarial and prior
    weights 1 are the DFQ (Choi et al.) runs of the CMI benchmark scripts (Fang et al., 2021: ``--adv 1 --bn 1``, which
    also add one-hot and class-balance terms not used here); ``bn_weight=0`` is DFAD itself. The learning-rate
    scheduler, if any, is built for both optimizers and stepped every epoch (DFAD decays both by the same milestones).

    Training data: none. Training runs on a :class:`~lightning_kd.data.synthetic.DataFreeDataModule` wrapping the real
    data module: its training batches are sample indices whose length is the batch size (``steps_per_epoch`` of
    them per epoch), and only the real data's validation/test loaders are read, for the metrics. Any other training
    data module is refused at ``setup``, before a batch is read; a loader of real batches is refused at its first batch.

    Optimization is manual: one training step makes ``student_steps + 1`` optimizer steps (with the generator), which
    is what ``Trainer(max_steps=...)`` counts. The generator is optimized by its own Adam and never by the student's
    optimizer (and the student never by Adam); the generator is saved in checkpoints but not in the exported student.
    Logged per training step: ``train/loss`` and ``train/loss_<discrepancy>`` (the last student update's),
    ``train/loss_generator`` and its weighted parts ``train/loss_generator_adversarial`` and
    ``train/loss_generator_bn``.

    The student's loss is the term :class:`~lightning_kd.terms.datafree.DataFreeKDTerm` (``terms.discrepancy``);
    terms added with :meth:`add_term` join the student's loss on the generated inputs, while the generator maximizes
    ``D`` alone.

    Args:
        generator: ``"dfad"`` (the adversarial generator) or ``"noise"`` (the noise baseline, no generator).
        latent_dim: size of the latent vector ``z``.
        generator_width: channels of the generator's last hidden layer (DFAD's ``ngf``).
        generator_lr: learning rate of the generator's Adam.
        student_steps: student updates per generator update.
        adversarial_weight: weight of the (negated) discrepancy in the generator's loss.
        bn_weight: weight of the BatchNorm-statistics prior in the generator's loss (0: DFAD without prior).
        discrepancy: ``"l1"`` or ``"kl"``, see above.
        temperature: temperature of the ``"kl"`` discrepancy.
        input_shape: ``(channels, height, width)`` of one input. The generator is built for it here when given, else
            in ``setup`` from the validation data's first input, then stored in the hyper-parameters so that
            ``load_from_checkpoint`` rebuilds the generator before its weights load.
        ce_weight: must stay 0: there are no labels to train with.
    """

    #: training batches are sample indices, not images (the inputs are generated): not checked as images
    trains_on_data_batches = False

    def __init__(self, *args, generator: str = "dfad", latent_dim: int = 256, generator_width: int = 64,
                 generator_lr: float = 1e-3, student_steps: int = 5, adversarial_weight: float = 1.0,
                 bn_weight: float = 1.0, discrepancy: str = "l1", temperature: float = 1.0,
                 input_shape: Sequence[int] | None = None, ce_weight: float = 0.0, **kwargs):
        if ce_weight != 0:
            raise ValueError(f"DataFreeKD trains without labels, so it has no cross-entropy: drop "
                             f"ce_weight={ce_weight} (or set it to 0)")
        super().__init__(*args, ce_weight=0.0, **kwargs)
        if generator not in GENERATORS:
            raise ValueError(f"unknown generator={generator!r}: choose one of {', '.join(GENERATORS)}")
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"unknown discrepancy={discrepancy!r}: choose one of {', '.join(DISCREPANCIES)}")
        if student_steps < 1:
            raise ValueError(f"student_steps must be at least 1, got {student_steps}")
        if min(adversarial_weight, bn_weight, generator_lr) < 0 or temperature <= 0:
            raise ValueError("adversarial_weight, bn_weight and generator_lr must be non-negative and temperature "
                             f"positive, got {adversarial_weight}, {bn_weight}, {generator_lr} and {temperature}")
        if generator == "dfad" and bn_weight > 0 and not self.teacher_bn_layers():
            raise ValueError(f"the teacher ({type(self.teacher).__name__}) has no BatchNorm layer with running "
                             "statistics for the generator's prior: set bn_weight=0 (DFAD without the prior)")
        self.add_term("discrepancy", DataFreeKDTerm(discrepancy, temperature))
        self.automatic_optimization = False
        self.generator: ImageGenerator | None = None
        self.input_shape: tuple[int, ...] | None = None
        if input_shape is not None:
            self.build_generator(input_shape)

    # ------------------------------------------------------------------------------------------------ parts
    def build_generator(self, input_shape: Sequence[int]) -> None:
        """Fix the input shape and, unless ``generator="noise"``, build the generator for it."""
        self.input_shape = tuple(int(size) for size in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"DataFreeKD generates images, so the input shape must be (channels, height, width), "
                             f"got {self.input_shape}: pass input_shape=(C, H, W)")
        if self.hparams.generator == "dfad":
            self.generator = ImageGenerator(self.input_shape, self.hparams.latent_dim, self.hparams.generator_width)

    def teacher_bn_layers(self) -> list[_BatchNorm]:
        """The teacher's BatchNorm layers that keep running statistics: where the prior is read."""
        return [m for m in self.teacher.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def generator_parameters(self) -> list[nn.Parameter]:
        return [] if self.generator is None else list(self.generator.parameters())

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student's optimizer sees: the trainable parameters except the generator's."""
        generator = {id(p) for p in self.generator_parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in generator]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and not isinstance(datamodule, DataFreeDataModule):
            raise ValueError(f"DataFreeKD must not read the training data, but got the data module "
                             f"{type(datamodule).__name__}: wrap it as lightning_kd.data.synthetic.DataFreeDataModule("
                             "datamodule=<your data module>), whose training batches are generated and whose "
                             "validation and test sets are yours")
        if stage == "fit" and self.input_shape is None:
            shape = getattr(datamodule, "input_shape", None)
            if shape is None:
                raise ValueError("DataFreeKD could not read the input shape from the validation data: pass "
                                 "input_shape=(channels, height, width) of one input to the method")
            self.hparams.input_shape = tuple(shape)
            self.build_generator(shape)

    # --------------------------------------------------------------------------------------------- losses
    def discrepancy(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``D(student, teacher)``: the L1 logit discrepancy or the temperature-scaled KL, as configured (the
        student's term, unweighted)."""
        term = self.terms["discrepancy"]
        return term.losses(None, ModelOutput(student_logits), ModelOutput(teacher_logits))[term.discrepancy_kind]

    def generator_losses(self, student_logits: Tensor, teacher_logits: Tensor,
                         bn_inputs: Sequence[tuple[_BatchNorm, Tensor]]) -> dict[str, Tensor]:
        """The generator's weighted losses: ``adversarial`` (the negated discrepancy) and ``bn`` (the prior, on the
        inputs of the teacher's BatchNorm layers, when ``bn_weight > 0``)."""
        hp = self.hparams
        losses = {"adversarial": -hp.adversarial_weight * self.discrepancy(student_logits, teacher_logits)}
        if hp.bn_weight > 0:
            losses["bn"] = hp.bn_weight * bn_statistics_loss([x for _, x in bn_inputs],
                                                             [m.running_mean for m, _ in bn_inputs],
                                                             [m.running_var for m, _ in bn_inputs])
        return losses

    # -------------------------------------------------------------------------------------------- synthesis
    def synthesize(self, batch_size: int) -> Tensor:
        """A batch of training inputs: ``G(z)`` for fresh ``z ~ N(0, I)``, or Gaussian noise without a generator."""
        if self.input_shape is None:
            raise RuntimeError("DataFreeKD has no input shape yet: pass input_shape=(C, H, W) or train through a "
                               "Trainer with a DataFreeDataModule (setup reads it from the validation data)")
        if self.generator is None:
            return torch.randn(batch_size, *self.input_shape, device=self.device)
        return self.generator(torch.randn(batch_size, self.hparams.latent_dim, device=self.device))

    @contextmanager
    def capture_bn_inputs(self) -> Iterator[list[tuple[_BatchNorm, Tensor]]]:
        """Within the block, every teacher BatchNorm layer with running statistics appends ``(layer, its input)``."""
        inputs: list[tuple[_BatchNorm, Tensor]] = []
        handles = [layer.register_forward_hook(lambda module, args, output: inputs.append((module, args[0])))
                   for layer in self.teacher_bn_layers()]
        try:
            yield inputs
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------------ steps
    def _student_step(self, optimizer: Any, batch_size: int, batch_idx: int) -> dict[str, Tensor]:
        with torch.no_grad():
            images = self.synthesize(batch_size)
        batch = Batch(images, torch.empty(0, dtype=torch.long, device=images.device))
        student_out, teacher_out = self.forward_student(batch), self.forward_teacher(batch)
        self._check_outputs(student_out.logits, teacher_out.logits)
        losses = self.distillation_losses(batch, student_out, teacher_out)
        loss = self.total_loss(losses, batch_idx, log_as=None, name_prefix="student ")
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return {"": loss.detach(), **{f"_{name}": value.detach() for name, value in losses.items()}}

    def _generator_step(self, optimizer: Any, batch_size: int, batch_idx: int) -> dict[str, Tensor]:
        self.toggle_optimizer(optimizer)  # the student and teacher get no gradients from this step
        try:
            images = self.synthesize(batch_size)
            if self.teacher.training:
                self.teacher.eval()
            # not forward_teacher, which runs without autograd: the generator learns through the teacher
            with self.capture_bn_inputs() as bn_inputs:
                teacher_logits = self.teacher(images)
            losses = self.generator_losses(self.student(images), teacher_logits, bn_inputs)
            loss = self.total_loss(losses, batch_idx, log_as=None, name_prefix="generator ")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        finally:
            self.untoggle_optimizer(optimizer)
        return {"_generator": loss.detach(), **{f"_generator_{name}": value.detach() for name, value in losses.items()}}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        batch_size = batch_size_of(batch)
        if self.replay_teacher is not None:
            raise ValueError("DataFreeKD's training inputs are new at every step, so the teacher's outputs cannot be "
                             "replayed from a cache: remove the TeacherOutputCache callback")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for _ in range(self.hparams.student_steps):
            logged = self._student_step(optimizers[0], batch_size, batch_idx)
        if self.generator is not None:
            logged.update(self._generator_step(optimizers[1], batch_size, batch_idx))
        for suffix, value in logged.items():
            self.log(f"train/loss{suffix}", value, prog_bar=suffix == "", batch_size=batch_size)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if "val/acc" in self.trainer.callback_metrics:
                    scheduler.step(self.trainer.callback_metrics["val/acc"])
            else:
                scheduler.step()

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer_factory(self.student_parameters())]
        if self.generator is not None:
            optimizers.append(torch.optim.Adam(self.generator_parameters(), lr=self.hparams.generator_lr))
        if self.lr_scheduler_factory is None:
            return optimizers
        return optimizers, [self.lr_scheduler_factory(optimizer) for optimizer in optimizers]
