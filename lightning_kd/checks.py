"""Checks of the batches a distillation module is fed, each failing with one error that names the fix."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


def check_batch(inputs: Tensor, target: Tensor | None, in_chans: int | None, stage: str, batch_idx: int) -> None:
    """Raise a ``ValueError`` for a batch that a classifier of ``in_chans`` input channels cannot learn from
    (``None``: not checked): integer images, images of the wrong rank or channel count, NaN/Inf values, or
    float or multi-dimensional class labels."""
    where = f"{stage} batch {batch_idx}"
    if not isinstance(inputs, Tensor):
        raise ValueError(f"{where}: the input is a {type(inputs).__name__}, not a tensor: the data module must yield "
                         "(images, labels) or a dict with 'input' and 'target'")
    if not inputs.is_floating_point():
        raise ValueError(f"{where}: the images are {inputs.dtype}, not floating point: convert and normalise them in "
                         "the data module (e.g. torchvision's ToTensor() + Normalize)")
    if inputs.dim() == 4 and in_chans is not None and inputs.shape[1] != in_chans:
        raise ValueError(f"{where}: the images have {inputs.shape[1]} channels (shape {tuple(inputs.shape)}) but the "
                         f"models were built with in_chans={in_chans}: set model.in_chans={inputs.shape[1]} (the CLI "
                         "links it from data.in_chans) or convert the images (e.g. Grayscale(num_output_channels="
                         f"{in_chans}))")
    if inputs.dim() == 3 and in_chans is not None:
        raise ValueError(f"{where}: the images have shape {tuple(inputs.shape)}, without a channel axis: give "
                         f"(batch, {in_chans}, height, width), e.g. images.unsqueeze(1)")
    finite = torch.isfinite(inputs)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{where}: the images hold {bad} NaN/Inf value(s): clean the data set or its transforms (a "
                         "normalisation by a zero std gives them)")
    if target is None:
        return
    if target.is_floating_point():
        raise ValueError(f"{where}: the labels are {target.dtype}; class labels must be integers (torch.long): "
                         "convert them in the data module, e.g. torch.as_tensor(labels, dtype=torch.long)")
    if target.dim() != 1:
        raise ValueError(f"{where}: the labels have shape {tuple(target.shape)}; give one class index per image, "
                         "shape (batch,)")


class InputChecks(Callback):
    """Runs :func:`check_batch` on training, validation and test batches (every batch on the CPU; the first batch
    of each epoch on an accelerator, where a check waits for the device)."""

    def _check(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, stage: str) -> None:
        unpack = getattr(pl_module, "unpack_batch", None)
        if unpack is None:
            return
        batch = unpack(batch)
        from lightning_kd.methods.lm import TokenBatch

        if isinstance(batch, TokenBatch):  # token ids, not images: LanguageModelKD checks them against its vocabulary
            return
        if batch.input.device.type != "cpu" and batch_idx > 0:
            return
        hparams = getattr(pl_module, "hparams", {})
        check_batch(batch.input, batch.target, hparams.get("in_chans"), stage, batch_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if getattr(pl_module, "trains_on_data_batches", True):  # DataFreeKD's training batches are sample indices
            self._check(trainer, pl_module, batch, batch_idx, "training")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer, pl_module, batch, batch_idx, "validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer, pl_module, batch, batch_idx, "test")
