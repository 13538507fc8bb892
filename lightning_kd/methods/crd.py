from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_kd.data.indexed import dataset_targets, with_indices
from lightning_kd.features import embedding_name
from lightning_kd.losses import contrast_scores, crd_loss, kd_loss, nce_normalizer
from lightning_kd.methods.base import Batch, DistillationModule, ModelOutput
from lightning_kd.nn import MemoryBank, gather_across_processes, sample_negatives

NEGATIVE_SAMPLING = ("other_class", "uniform")


class CRD(DistillationModule):
    """Contrastive representation distillation (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

    The pooled embeddings of student and teacher go through trainable linear heads to ``embedding_dim`` and are
    L2-normalised (``s``, ``t``). Each side has a memory bank of one such vector per training sample
    (:class:`~lightning_kd.nn.MemoryBank`, momentum ``memory_momentum``). For a sample ``i``, ``s_i`` must pick out
    row ``i`` of the teacher's bank among ``num_negatives`` negatives, and ``t_i`` row ``i`` of the student's bank:
    ``loss = ce_weight · CE + crd_weight · [nce(s, M_t) + nce(t, M_s)] + kd_weight · T² · KL``, each NCE term summed
    over the positive and the negatives and averaged over the batch, scores ``exp(m · a / nce_temperature) / Z``
    with ``Z`` estimated on the first batch and then fixed (:func:`~lightning_kd.losses.crd_loss`). After each
    training batch both banks take the batch's embeddings.

    Defaults: the CIFAR-100 setting of the paper's RepDistiller code (``train_student.py --distill crd -r 1 -a 0
    -b 0.8``: CE 1, no KD, CRD 0.8; ``feat_dim=128``, ``nce_k=16384``, ``nce_t=0.07``, ``nce_m=0.5``,
    ``mode='exact'``: the positive is the sample itself). CRD+KD is ``kd_weight=1`` (``-a 1``, KD temperature 4).
    Negatives are drawn as the reference's CIFAR-100 sampler does (``negatives="other_class"``): uniformly among
    the training samples of the other classes, distinct when there are enough, with replacement otherwise;
    ``"uniform"`` draws among all other samples instead.

    CRD needs each training sample's index: batches ``(input, target, index)``. With ``index_data`` (default) and
    a data module that keeps its splits in ``datasets`` (every :class:`~lightning_kd.data.SplitDataModule`), the
    training split is wrapped in :class:`~lightning_kd.data.IndexedDataset` at ``setup``; otherwise wrap the data
    yourself (:class:`~lightning_kd.data.IndexedDataModule`, :class:`~lightning_kd.data.IndexedDataset`).

    Under DDP, each process draws the negatives of its own samples (from a generator seeded with the global seed
    plus its rank, so equally seeded processes still draw independently); the memory update gathers the
    embeddings and indices of all processes, and ``Z`` is averaged over them, so every process holds the same
    banks (DDP's buffer broadcast then changes nothing).

    Args:
        crd_weight: weight of the contrastive loss.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of a KD term on the logits (0: plain CRD; 1: CRD+KD).
        kd_temperature: temperature of the KD term.
        embedding_dim: size of the embedding heads' output and of the memory rows.
        num_negatives: negatives per sample (``K``).
        nce_temperature: temperature of the contrast scores.
        memory_momentum: weight of the stored row in the memory update.
        negatives: ``"other_class"`` or ``"uniform"``, see above.
        student_layer: module name of the student's feature, instead of its embedding.
        teacher_layer: module name of the teacher's feature, instead of its embedding.
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; the heads are built from the feature sizes of one dry
            forward pass on it: here when given, else in ``setup`` from the data (then stored in the
            hyper-parameters so that ``load_from_checkpoint`` rebuilds the heads).
        num_samples: size N of the training set, the memory banks' rows: here when given, else in ``setup`` from
            the training data (then stored in the hyper-parameters).
        index_data: give the training split of a ``datasets``-keeping data module the sample indices at ``setup``.
    """

    def __init__(self, *args, crd_weight: float = 0.8, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 4.0, embedding_dim: int = 128, num_negatives: int = 16384,
                 nce_temperature: float = 0.07, memory_momentum: float = 0.5, negatives: str = "other_class",
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 input_shape: Sequence[int] | None = None, num_samples: int | None = None, index_data: bool = True,
                 **kwargs):
        super().__init__(*args, ce_weight=ce_weight, **kwargs)
        if negatives not in NEGATIVE_SAMPLING:
            raise ValueError(f"unknown negatives={negatives!r}: choose one of {', '.join(NEGATIVE_SAMPLING)}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        self.use_features(student_layer or embedding_name(self.student),
                          teacher_layer or embedding_name(self.teacher))
        self.student_head: nn.Linear | None = None
        self.teacher_head: nn.Linear | None = None
        self.student_memory: MemoryBank | None = None
        self.teacher_memory: MemoryBank | None = None
        self._pending_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._state_checked = False
        self.init_projection(input_shape)
        if num_samples is not None:
            self.build_memory(num_samples)

    # --------------------------------------------------------------------------------------------- building
    def build_projection(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        """The linear embedding heads, from the sizes of the hooked features."""
        dim = self.hparams.embedding_dim
        self.student_head = nn.Linear(math.prod(student_shape[1:]), dim)
        self.teacher_head = nn.Linear(math.prod(teacher_shape[1:]), dim)

    def build_memory(self, num_samples: int) -> None:
        """The two memory banks of ``num_samples`` rows, the NCE constants (``-1``: not yet estimated) and, for
        ``negatives="other_class"``, the class of every training sample (``-1``: not yet read)."""
        if num_samples < 2:
            raise ValueError(f"CRD needs at least 2 training samples, got num_samples={num_samples}")
        dim, momentum = self.hparams.embedding_dim, self.hparams.memory_momentum
        self.student_memory = MemoryBank(num_samples, dim, momentum)
        self.teacher_memory = MemoryBank(num_samples, dim, momentum)
        self.register_buffer("nce_normalizers", torch.full((2,), -1.0))
        if self.hparams.negatives == "other_class":
            self.register_buffer("train_targets", torch.full((num_samples,), -1, dtype=torch.long))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dataset = self._training_dataset() if stage == "fit" else None
        if stage != "fit":
            return
        if self.student_memory is None:
            if dataset is None:
                raise ValueError("could not read the training set to size CRD's memory banks: pass num_samples=<number "
                                 "of training samples>")
            self.hparams.num_samples = len(dataset)
            self.build_memory(self.hparams.num_samples)
        num_samples = self.student_memory.num_samples
        if dataset is not None and len(dataset) != num_samples:
            raise ValueError(f"the training set has {len(dataset)} samples but CRD's memory banks have {num_samples} "
                             "rows: set num_samples to the training set size (one row per sample index)")
        if self.hparams.negatives == "other_class" and dataset is not None:
            targets = dataset_targets(dataset)
            if len(targets.unique()) < 2:
                raise ValueError("negatives='other_class' needs at least two classes in the training set: use "
                                 "negatives='uniform'")
            self.train_targets.copy_(targets)
        self._state_checked = False

    def _training_dataset(self) -> Dataset | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", None)
        if isinstance(datasets, dict) and "train" in datasets:
            if self.hparams.index_data:
                datasets["train"] = with_indices(datasets["train"])
            return datasets["train"]
        source = getattr(self.trainer.fit_loop, "_data_source", None)
        if source is None or getattr(source, "instance", None) is None or not source.is_defined():
            return None
        loader = source.dataloader()
        dataset = getattr(loader, "dataset", None)
        try:
            len(dataset)
        except TypeError:
            return None
        return dataset

    # ------------------------------------------------------------------------------------------------ losses
    def _check_state(self, index: Tensor) -> None:
        """On the first training step (one host synchronisation): the indices lie in the banks and, for
        ``negatives="other_class"``, every sample's class is known."""
        num_samples = self.student_memory.num_samples
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_samples:
            raise ValueError(f"sample indices must lie in [0, {num_samples - 1}] (CRD's memory banks have num_samples="
                             f"{num_samples} rows), but the batch holds indices from {low} to {high}: index the "
                             "training set 0..N-1 and set num_samples=N")
        if self.hparams.negatives == "other_class" and bool((self.train_targets < 0).any()):
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
        targets = self.train_targets if self.hparams.negatives == "other_class" else None
        negatives = sample_negatives(index, self.hparams.num_negatives, self.student_memory.num_samples, targets,
                                     self._negatives_generator(index.device))
        return torch.cat([index[:, None], negatives], dim=1)

    def _negatives_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded once from the global one plus the process rank: processes seeded alike (as
        ``seed_everything`` does) still draw independent negatives for their samples."""
        if self._generator is None or self._generator.device != device:
            seed = int(torch.randint(0, 2**62, (1,))) + self.global_rank
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def distillation_losses(self, batch: Batch, student_out: ModelOutput,
                            teacher_out: ModelOutput) -> dict[str, Tensor]:
        if batch.index is None:
            raise ValueError("CRD needs each training sample's index, but the batches are (input, target) only: give "
                             "it (input, target, index) batches, e.g. with a lightning_kd data module and "
                             "index_data=True, wrapping the data module in lightning_kd.data.IndexedDataModule, or "
                             "the training data set in lightning_kd.data.IndexedDataset")
        if self.student_memory is None or self.student_head is None:
            raise RuntimeError("CRD's heads and memory banks are not built: pass input_shape and num_samples, or "
                               "train through a Trainer (setup builds them from the data)")
        index = batch.index.to(self.student_memory.memory.device, torch.long)
        first_step = not self._state_checked
        if first_step:
            self._check_state(index)
        student_features, = student_out.features.values()
        teacher_features, = teacher_out.features.values()
        student, teacher = self.embed(student_features, teacher_features)
        contrast_index = self.contrast_index(index)
        student_memory, teacher_memory = self.student_memory.memory, self.teacher_memory.memory
        if first_step and bool((self.nce_normalizers < 0).any()):
            self._estimate_normalizers(student, teacher, contrast_index)
        temperature = self.hparams.nce_temperature
        loss = crd_loss(student, teacher, student_memory, teacher_memory, contrast_index,
                        (self.nce_normalizers[0], self.nce_normalizers[1]), temperature)
        # the banks change after backward (it reads them): on_train_batch_end applies this
        self._pending_update = (student.detach(), teacher.detach(), index)
        losses = {"crd": self.hparams.crd_weight * loss}
        if self.hparams.kd_weight:
            losses["kd"] = self.hparams.kd_weight * kd_loss(student_out.logits, teacher_out.logits,
                                                            self.hparams.kd_temperature)
        return losses

    @torch.no_grad()
    def _estimate_normalizers(self, student: Tensor, teacher: Tensor, contrast_index: Tensor) -> None:
        """``Z = N · mean(scores)`` on this batch (averaged over processes), for each side not yet estimated."""
        num_samples, temperature = self.student_memory.num_samples, self.hparams.nce_temperature
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

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_memory()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._state_checked = False
