"""Small trainable parts shared by methods (projectors from student to teacher features)."""

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

__all__ = ["PROJECTORS", "MLP", "ChannelBatchNorm", "ConvBN", "ConvReg", "Linear", "ProjectorEnsemble",
           "build_projector"]
