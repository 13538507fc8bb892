"""Lightning data modules. Each exposes ``num_classes`` and ``in_chans`` (linked to the model by the CLI)."""

from lightning_kd.data.digits import DigitsDataModule, EpochSeededSampler, split_indices

__all__ = ["DigitsDataModule", "EpochSeededSampler", "split_indices"]
