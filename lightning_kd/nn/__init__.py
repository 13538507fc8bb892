"""Small trainable parts shared by methods (projectors from student to teacher features, memory banks, CTKD's
learnable temperature)."""

from lightning_kd.nn.adapters import (
    Paraphraser,
    Translator,
    VIDRegressor,
    boundary_connector,
    channel_connector,
    factor_channels,
)
from lightning_kd.nn.generator import ImageGenerator
from lightning_kd.nn.review import ABF, ReviewFusion, as_map
from lightning_kd.nn.memory import MemoryBank, gather_across_processes, sample_negatives
from lightning_kd.nn.projectors import (
    PROJECTORS,
    MLP,
    ChannelBatchNorm,
    ConvBN,
    ConvReg,
    Linear,
    ProjectorEnsemble,
    build_projector,
)
from lightning_kd.nn.temperature import cosine_lambda, ctkd_temperature, gradient_reversal

__all__ = ["PROJECTORS", "MLP", "ChannelBatchNorm", "ConvBN", "ConvReg", "Linear", "ProjectorEnsemble",
           "build_projector", "MemoryBank", "gather_across_processes", "sample_negatives", "ABF", "ReviewFusion", "as_map",
           "Paraphraser", "Translator", "VIDRegressor", "boundary_connector", "channel_connector", "factor_channels",
           "ImageGenerator", "gradient_reversal", "ctkd_temperature", "cosine_lambda"]
