"""The image generator of data-free distillation: latent vectors in, a batch of normalised images out.

>>> import torch
>>> generator = ImageGenerator(image_shape=(1, 8, 8), latent_dim=100, width=16)
>>> generator(torch.randn(4, 100)).shape
torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class ImageGenerator(nn.Module):
    """The generator of DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019, official ``GeneratorA``), which
    is that of DAFL (Chen et al., ICCV 2019):

    ``z`` → Linear → reshape to ``2·width`` maps of a quarter of the image size → BatchNorm → 2× upsampling →
    3×3 conv → BatchNorm → LeakyReLU(0.2) → 2× upsampling → 3×3 conv (``width``) → BatchNorm → LeakyReLU(0.2) →
    3×3 conv (image channels) → tanh → BatchNorm without affine parameters.

    The last BatchNorm gives each channel of a batch zero mean and unit variance: the statistics of inputs normalised
    per channel with the training set's mean and std, as every data module here delivers them, so the generator
    needs no knowledge of the data's normalisation. Sizes that are not multiples of 4 are reached by upsampling
    to ``ceil(size/4)``, ``ceil(size/2)`` and ``size`` (nearest neighbour, as the reference).

    Args:
        image_shape: ``(channels, height, width)`` of one generated image.
        latent_dim: size of the latent vector ``z`` (DFAD: 256 on CIFAR).
        width: channels of the last hidden layer, doubled in the first (DFAD's ``ngf``: 64).
    """

    def __init__(self, image_shape: Sequence[int], latent_dim: int = 256, width: int = 64):
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"the generator makes images: image_shape must be (channels, height, width), got "
                             f"{tuple(image_shape)}; pass input_shape=(C, H, W) of one input")
        if latent_dim < 1 or width < 1:
            raise ValueError(f"latent_dim and width must be positive, got {latent_dim} and {width}")
        channels, height, image_width = (int(size) for size in image_shape)
        self.image_shape = (channels, height, image_width)
        self.latent_dim = latent_dim
        self.sizes = [(math.ceil(height / 4), math.ceil(image_width / 4)),
                      (math.ceil(height / 2), math.ceil(image_width / 2)), (height, image_width)]
        first = self.sizes[0]
        self.project = nn.Linear(latent_dim, 2 * width * first[0] * first[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.LeakyReLU(0.2, inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width),
                                    nn.LeakyReLU(0.2, inplace=True))
        self.to_image = nn.Sequential(nn.Conv2d(width, channels, 3, padding=1), nn.Tanh(),
                                      nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z.flatten(1)).view(z.shape[0], -1, *self.sizes[0])
        out = F.interpolate(self.bn0(out), size=self.sizes[1], mode="nearest")
        out = F.interpolate(self.block1(out), size=self.sizes[2], mode="nearest")
        return self.to_image(self.block2(out))


__all__ = ["ImageGenerator"]
