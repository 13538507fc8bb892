"""Teacher outputs computed once for every view a run will train on, stored on disk and replayed.

With a ``device_resident`` data module the view of sample ``i`` at epoch ``e`` is a function of
``(shuffle_seed, e, i)`` (:mod:`lightning_kd.data.device`), so the teacher's outputs for all the views of a whole
run can be computed before it, at large batch size and without a backward pass, and the training steps then skip
the teacher. Only methods that distil from the teacher's logits can replay them; validation still runs the live
teacher for its metrics.

Storage (a folder): ``logprobs.npy``, float16 ``epochs × N × k`` — the teacher's top-``k`` log-probabilities
(log-softmax at temperature 1) of every view, memory-mapped; ``indices.npy``, int32 ``epochs × N × k`` — their
classes (absent when ``k`` is the number of classes: then all classes are stored in order); ``meta.json`` — what
the outputs depend on (teacher weights, data, seed, augmentation, epochs, precision), checked before reuse.
Replayed logits are the stored log-probabilities, with the probability mass left outside the top-``k`` spread
evenly over the other classes: exact (up to float16) when ``k`` is the number of classes, the soft labels of the
top-``k`` classes exact at temperature 1 otherwise (the FKD scheme: Shen & Xing, "A Fast Knowledge Distillation
Framework for Visual Recognition", ECCV 2022).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_kd.data.device import DeviceBatches
from lightning_kd.methods.base import Batch, DistillationModule


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of a module's state: names, dtypes, shapes and values."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(images: Tensor, targets: Tensor) -> str:
    """SHA-1 of a whole data set's images and targets."""
    digest = hashlib.sha1(images.cpu().contiguous().numpy().tobytes())
    digest.update(targets.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def expand_top_k(logprobs: Tensor, indices: Tensor | None, num_classes: int) -> Tensor:
    """Full ``B × num_classes`` logits from top-``k`` log-probabilities: the given classes keep theirs, the others
    share the remaining probability mass evenly (a floor of 1e-8 keeps the logits finite)."""
    logprobs = logprobs.float()
    if indices is None:
        return logprobs
    k = logprobs.shape[-1]
    rest = (1.0 - logprobs.exp().sum(-1, keepdim=True)).clamp_min(1e-8) / max(num_classes - k, 1)
    full = rest.log().expand(-1, num_classes).clone()
    return full.scatter_(-1, indices.long(), logprobs)


class TeacherOutputCache(L.Callback):
    """Replay the teacher's outputs for the exact training views from a cache built before the first step.

    Args:
        path: folder of the cache; built at the start of ``fit`` when absent or made for something else (another
            teacher, data, seed, augmentation, precision or fewer epochs), reused otherwise.
        top_k: classes kept per view; ``None`` keeps all (exact replay).
        batch_size: views per teacher forward while building.

    Needs a ``device_resident`` data module (views determined by seed, epoch and index) and a method that
    distils from logits. Under DDP the first process builds the cache while the others wait.

    >>> # lightning-kd fit --config ... --data.device_resident true \\
    >>> #     --trainer.callbacks+=lightning_kd.cache.TeacherOutputCache --trainer.callbacks.path cache/kd_r32x4
    """

    def __init__(self, path: str | os.PathLike, top_k: int | None = None, batch_size: int = 1024):
        self.path, self.top_k, self.batch_size = Path(path), top_k, batch_size
        self._logprobs: np.ndarray | None = None
        self._indices: np.ndarray | None = None
        self._epoch_outputs: tuple[int, Tensor, Tensor | None] | None = None
        self._batches: DeviceBatches | None = None
        self.num_classes = 0
        #: seconds the last build took (``None`` when the cache was reused)
        self.build_seconds: float | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DistillationModule) or pl_module.teacher is None:
            raise ValueError("TeacherOutputCache needs a distillation method with a teacher")
        if pl_module.teacher_layers:
            raise ValueError(f"{type(pl_module).__name__} uses the teacher's features ({', '.join(pl_module.teacher_layers)})"
                             "; TeacherOutputCache replays logits only: remove the callback for feature methods")
        batches = trainer.train_dataloader
        if not isinstance(batches, DeviceBatches):
            raise ValueError("TeacherOutputCache needs the training views to be a function of (seed, epoch, index): "
                             "use a data module with device_resident=True")
        epochs = self._epochs(trainer)
        self.num_classes = pl_module.num_classes
        meta = self._meta(trainer, pl_module, batches, epochs)
        if trainer.is_global_zero and not self._matches(meta):
            self._build(trainer, pl_module, batches, meta)
        trainer.strategy.barrier("teacher_output_cache")
        self._open()
        self._batches = batches
        pl_module.replay_teacher = self.replay

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.replay_teacher = None
        self._epoch_outputs = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    @staticmethod
    def _epochs(trainer: L.Trainer) -> int:
        if trainer.max_epochs is not None and trainer.max_epochs >= 1:
            return trainer.max_epochs
        steps, per_epoch = trainer.max_steps, trainer.num_training_batches
        if steps is None or steps < 1 or not math.isfinite(per_epoch):
            raise ValueError("TeacherOutputCache stores the views of every epoch: set trainer.max_epochs or max_steps")
        return math.ceil(steps / per_epoch)

    def _meta(self, trainer: L.Trainer, pl_module: DistillationModule, batches: DeviceBatches,
              epochs: int) -> dict[str, Any]:
        k = self.num_classes if self.top_k is None else min(self.top_k, self.num_classes)
        return {"teacher": fingerprint(pl_module.teacher), "num_samples": len(batches.targets),
                "data": data_fingerprint(batches.images, batches.targets),
                "num_classes": self.num_classes, "top_k": k, "seed": batches.seed, "epochs": epochs,
                "padding": batches.augmentation.padding, "flip": batches.augmentation.flip,
                "mean": list(batches.mean), "std": list(batches.std), "precision": str(trainer.precision)}

    def _matches(self, meta: dict[str, Any]) -> bool:
        try:
            stored = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return {**stored, "epochs": 0} == {**meta, "epochs": 0} and stored["epochs"] >= meta["epochs"]

    @torch.no_grad()
    def _build(self, trainer: L.Trainer, pl_module: DistillationModule, batches: DeviceBatches,
               meta: dict[str, Any]) -> None:
        started = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "meta.json").unlink(missing_ok=True)  # written last: a half-built cache is never reused
        epochs, count, k = meta["epochs"], meta["num_samples"], meta["top_k"]
        full = k == self.num_classes
        logprobs = np.lib.format.open_memmap(self.path / "logprobs.npy", mode="w+", dtype=np.float16,
                                             shape=(epochs, count, k))
        indices = None if full else np.lib.format.open_memmap(self.path / "indices.npy", mode="w+", dtype=np.int32,
                                                              shape=(epochs, count, k))
        teacher = pl_module.teacher.eval()
        device = batches.images.device
        for epoch in range(epochs):
            for start in range(0, count, self.batch_size):
                index = torch.arange(start, min(start + self.batch_size, count), device=device)
                with trainer.precision_plugin.forward_context():
                    logits = teacher(pl_module._input(batches.views(index, epoch)))
                logp = torch.log_softmax(logits.float(), dim=-1)
                if full:
                    logprobs[epoch, start:start + len(index)] = logp.half().cpu().numpy()
                else:
                    values, classes = logp.topk(k, dim=-1)
                    logprobs[epoch, start:start + len(index)] = values.half().cpu().numpy()
                    indices[epoch, start:start + len(index)] = classes.int().cpu().numpy()
        logprobs.flush()
        if indices is not None:
            indices.flush()
        else:
            (self.path / "indices.npy").unlink(missing_ok=True)
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1))
        self.build_seconds = time.perf_counter() - started

    def _open(self) -> None:
        self._logprobs = np.load(self.path / "logprobs.npy", mmap_mode="r")
        indices = self.path / "indices.npy"
        self._indices = np.load(indices, mmap_mode="r") if indices.is_file() else None

    # ----------------------------------------------------------------------------------------------- replay
    def outputs(self, epoch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The stored top-k log-probabilities (and classes) of every view of ``epoch``, on ``device``."""
        if self._epoch_outputs is None or self._epoch_outputs[0] != epoch or self._epoch_outputs[1].device != device:
            if epoch >= self._logprobs.shape[0]:
                raise ValueError(f"the teacher-output cache in {self.path} holds {self._logprobs.shape[0]} epochs, "
                                 f"but training reached epoch {epoch}: delete it to rebuild it for max_epochs")
            logprobs = torch.from_numpy(np.ascontiguousarray(self._logprobs[epoch])).to(device)
            indices = None if self._indices is None else \
                torch.from_numpy(np.ascontiguousarray(self._indices[epoch])).to(device)
            self._epoch_outputs = (epoch, logprobs, indices)
        return self._epoch_outputs[1], self._epoch_outputs[2]

    def replay(self, batch: Batch, epoch: int | None = None) -> Tensor:
        """The teacher's logits for the views in ``batch`` (its ``index``) at ``epoch`` (default: the batch's)."""
        if batch.index is None:
            raise ValueError("replaying teacher outputs needs the sample indices in every batch: use a data module "
                             "with device_resident=True")
        if epoch is None:  # the epoch of the views being served (also after a resume in the middle of an epoch)
            epoch = self._batches.epoch
        logprobs, indices = self.outputs(epoch, batch.index.device)
        index = batch.index
        return expand_top_k(logprobs.index_select(0, index),
                            None if indices is None else indices.index_select(0, index), self.num_classes)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.outputs(trainer.current_epoch, pl_module.device)  # loaded before the first step of the epoch


__all__ = ["TeacherOutputCache", "data_fingerprint", "expand_top_k", "fingerprint"]
