"""Contrastive terms: CRD's memory-bank NCE."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_kd.data.indexed import dataset_targets, index_training_split, training_split
from lightning_kd.features import embedding_name
from lightning_kd.losses import contrast_scores, crd_loss, nce_normalizer
from lightning_kd.nn import MemoryBank, gather_across_processes, sample_negatives
from lightning_kd.terms.base import DistillationTerm

NEGATIVE_SAMPLING = ("other_class", "uniform")


class CRDTerm(DistillationTerm):
    """Contrastive representation distillation (Tian et al., ICLR 2020): ``{"crd": nce(s, M_t) + nce(t, M_s)}``.

    The hooked student and teacher features (by default each model's pooled embedding) go through trainable linear
    heads to ``embedding_dim`` and are L2-normalised (``s``, ``t``). Each side has a memory bank of one such vector per
    training sample (:class:`~lightning_kd.nn.MemoryBank`, momentum ``memory_momentum``): ``s_i`` must pick out row
    ``i`` of the teacher's bank among ``num_negatives`` negatives, and ``t_i`` row ``i`` of the student's bank; each NCE
    term is summed over the positive and the negatives and averaged over the batch, scores ``exp(m · a /
    nce_temperature) / Z`` with ``Z`` estimated on the first batch and then fixed
    (:func:`~lightning_kd.losses.crd_loss`). After each training batch both banks take the batch's embeddings.
    Negatives are drawn as the reference's CIFAR-100 sampler does (``negatives="other_class"``): uniformly among the
    training samples of the other classes; ``"uniform"`` draws among all other samples.

    The term needs each training sample's index (``(input, target, index)`` batches). The memory banks are sized from
    the training split: ``num_samples`` when given, else the data module's training split at ``setup`` (with
    ``index_data``, :func:`~lightning_kd.data.indexed.index_training_split` gives its batches their indices), else
    the training data loader's data set when training starts. The classes of the training samples come from the same
    data set.

    Under DDP, each process draws the negatives of its own samples (from a generator seeded with the global seed plus
    its rank); the memory update gathers the embeddings and indices of all processes, and ``Z`` is averaged over them,
    so every process holds the same banks.

    Args:
        embedding_dim: size of the embedding heads' output and of the memory rows.
        num_negatives: negatives per sample (``K``).
        nce_temperature: temperature of the contrast scores.
        memory_momentum: weight of the stored row in the memory update.
        negatives: ``"other_class"`` or ``"uniform"``.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        num_samples: size N of the training set (the banks' rows), instead of reading it from the data.
        index_data: give the training split of a ``datasets``-keeping data module the sample indices at ``setup``.
        weight, warmup_epochs: see :class:`~lightning_kd.terms.DistillationTerm`.
    """

    needs_shapes = True

    def __init__(self, embedding_dim: int = 128, num_negatives: int = 16384, nce_temperature: float = 0.07,
                 memory_momentum: float = 0.5, negatives: str = "other_class", student_layer: str | None = None,
                 teacher_layer: str | None = None, num_samples: int | None = None, index_data: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        if negatives not in NEGATIVE_SAMPLING:
            raise ValueError(f"unknown negatives={negatives!r}: choose one of {', '.join(NEGATIVE_SAMPLING)}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        self.embedding_dim, self.num_negatives, self.nce_temperature = embedding_dim, num_negatives, nce_temperature
        self.memory_momentum, self.negatives, self.index_data = memory_momentum, negatives, index_data
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_head: nn.Linear | None = None
        self.teacher_head: nn.Linear | None = None
        self.student_memory: MemoryBank | None = None
        self.teacher_memory: MemoryBank | None = None
        self._pending_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._state_checked = False
        if num_samples is not None:
            self.build_memory(num_samples)

    # --------------------------------------------------------------------------------------------- building
    def layers(self, student, teacher):
        return [self.student_layer or embedding_name(student)], [self.teacher_layer or embedding_name(teacher)]

    def build(self, student_shapes, teacher_shapes) -> None:
        """The linear embedding heads, from the sizes of the hooked features."""
        self.student_head = nn.Linear(math.prod(student_shapes[0][1:]), self.embedding_dim)
        self.teacher_head = nn.Linear(math.prod(teacher_shapes[0][1:]), self.embedding_dim)

    @property
    def num_samples(self) -> int | None:
        """Rows of the memory banks (``None`` before they are built)."""
        return None if self.student_memory is None else self.student_memory.num_samples

    def build_memory(self, num_samples: int) -> None:
        """The two memory banks of ``num_samples`` rows, the NCE constants (``-1``: not yet estimated) and, for
        ``negatives="other_class"``, the class of every training sample (``-1``: not yet read)."""
        if num_samples < 2:
            raise ValueError(f"CRD needs at least 2 training samples, got num_samples={num_samples}")
        self.student_memory = MemoryBank(num_samples, self.embedding_dim, self.memory_momentum)
        self.teacher_memory = MemoryBank(num_samples, self.embedding_dim, self.memory_momentum)
        self.register_buffer("nce_normalizers", torch.full((2,), -1.0))
        if self.negatives == "other_class":
            self.register_buffer("train_targets", torch.full((num_samples,), -1, dtype=torch.long))
        if self._host is not None:
            self.to(self.host.device)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(self.host.trainer, "datamodule", None)
        dataset = index_training_split(datamodule) if self.index_data else training_split(datamodule)
        if dataset is not None:
            self._read_training_set(dataset)

    def on_train_start(self) -> None:
        targets_unknown = self.negatives == "other_class" and self.student_memory is not None and bool(
            (self.train_targets < 0).any())
        if self.student_memory is None or targets_unknown:
            dataset = getattr(self.host.trainer.train_dataloader, "dataset", None)
            try:
                len(dataset)
            except TypeError:
                dataset = None
            if dataset is None and self.student_memory is None:
                raise ValueError("could not read the training set to size CRD's memory banks: pass num_samples=<number "
                                 "of training samples>")
            if dataset is not None:
                self._read_training_set(dataset)

    def _read_training_set(self, dataset: Dataset) -> None:
        """Size the banks from ``dataset`` (when not yet built) and read the class of each of its samples."""
        size = len(dataset)
        if self.student_memory is None:
            self.__dict__["_init_args"]["num_samples"] = size
            if "num_samples" in self.host.hparams:
                self.host.hparams.num_samples = size
            self.build_memory(size)
        if size != self.num_samples:
            raise ValueError(f"the training set has {size} samples but CRD's memory banks have {self.num_samples} "
                             "rows: set num_samples to the training set size (one row per sample index)")
        if self.negatives == "other_class":
            targets = dataset_targets(dataset)
            if len(targets.unique()) < 2:
                raise ValueError("negatives='other_class' needs at least two classes in the training set: use "
                                 "negatives='uniform'")
            self.train_targets.copy_(targets)
        self._state_checked = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.student_memory is None:  # size the banks from the checkpoint's (current or pre-term key)
            state = checkpoint.get("state_dict", {})
            rows = next((value.shape[0] for key, value in state.items()
                         if key.endswith("student_memory.memory") and value.dim() == 2), None)
            if rows is not None:
                self.build_memory(rows)
        self._state_checked = False

    # ------------------------------------------------------------------------------------------------ losses
    def _check_state(self, index: Tensor) -> None:
        """On the first training step (one host synchronisation): the indices lie in the banks and, for
        ``negatives="other_class"``, every sample's class is known."""
        num_samples = self.num_samples
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_samples:
            raise ValueError(f"sample indices must lie in [0, {num_samples - 1}] (CRD's memory banks have num_samples="
                             f"{num_samples} rows), but the batch holds indices from {low} to {high}: index the "
                             "training set 0..N-1 and set num_samples=N")
        if self.negatives == "other_class" and bool((self.train_targets < 0).any()):
            raise ValueError("negatives='other_class' needs the class of every training sample, which setup reads "
                             "from the training data: train through a Trainer, fill `train_targets`, or use "
                             "negatives='uniform'")
        self._state_checked = True

    def embed(self, student_features: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-length ``(B, embedding_dim)`` embeddings of the hooked student and teacher features."""
        student = F.normalize(self.student_head(student_features.flatten(1)), dim=1)
        teacher = F.normalize(self.teacher_head(teacher_features.flatten(1)), dim=1)
        return student, teacher

    def contrast_index(self, index: Tensor) -> Tensor:
        """``(B, 1 + num_negatives)`` memory rows per sample: the sample itself, then its negatives."""
        targets = self.train_targets if self.negatives == "other_class" else None
        negatives = sample_negatives(index, self.num_negatives, self.num_samples, targets,
                                     self._negatives_generator(index.device))
        return torch.cat([index[:, None], negatives], dim=1)

    def _negatives_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded once from the global one plus the process rank: processes seeded alike (as
        ``seed_everything`` does) still draw independent negatives for their samples."""
        if self._generator is None or self._generator.device != device:
            seed = int(torch.randint(0, 2**62, (1,))) + self.host.global_rank
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def losses(self, batch, student_out, teacher_out) -> dict[str, Tensor]:
        if batch.index is None:
            raise ValueError("CRD needs each training sample's index, but the batches are (input, target) only: give "
                             "it (input, target, index) batches, e.g. with a lightning_kd data module and "
                             "index_data=True, wrapping the data module in lightning_kd.data.IndexedDataModule, or "
                             "the training data set in lightning_kd.data.IndexedDataset")
        if self.student_memory is None:
            raise RuntimeError("CRD's memory banks are not built: pass num_samples, or train through a Trainer (setup "
                               "sizes them from the training data)")
        index = batch.index.to(self.student_memory.memory.device, torch.long)
        first_step = not self._state_checked
        if first_step:
            self._check_state(index)
        student_features, = self.student_features(student_out)
        teacher_features, = self.teacher_features(teacher_out)
        student, teacher = self.embed(student_features, teacher_features)
        contrast_index = self.contrast_index(index)
        if first_step and bool((self.nce_normalizers < 0).any()):
            self._estimate_normalizers(student, teacher, contrast_index)
        loss = crd_loss(student, teacher, self.student_memory.memory, self.teacher_memory.memory, contrast_index,
                        (self.nce_normalizers[0], self.nce_normalizers[1]), self.nce_temperature)
        # the banks change after backward (it reads them): on_train_batch_end applies this
        self._pending_update = (student.detach(), teacher.detach(), index)
        return {"crd": loss}

    @torch.no_grad()
    def _estimate_normalizers(self, student: Tensor, teacher: Tensor, contrast_index: Tensor) -> None:
        """``Z = N · mean(scores)`` on this batch (averaged over processes), for each side not yet estimated."""
        num_samples, temperature = self.num_samples, self.nce_temperature
        estimates = torch.stack([
            nce_normalizer(contrast_scores(student, self.teacher_memory.memory, contrast_index, temperature),
                           num_samples),
            nce_normalizer(contrast_scores(teacher, self.student_memory.memory, contrast_index, temperature),
                           num_samples)])
        estimates = gather_across_processes(estimates[None]).mean(0)
        self.nce_normalizers.copy_(torch.where(self.nce_normalizers > 0, self.nce_normalizers, estimates))

    @torch.no_grad()
    def update_memory(self) -> None:
        """Blend the last training batch's embeddings into both memory banks (gathered over processes)."""
        if self._pending_update is None:
            return
        student, teacher, index = self._pending_update
        self._pending_update = None
        self.student_memory.update(student, index)
        self.teacher_memory.update(teacher, index)

    def on_train_batch_end(self) -> None:
        self.update_memory()
