"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, ICLR 2015), as used by CRD/RepDistiller and mdistiller.

Five blocks of 3×3 conv(bias)-BN-ReLU layers (64, 128, 256, 512, 512 channels) with 2×2 max-pooling after the first
three, global average pooling and one linear ``classifier``: no fully connected hidden layers. ``vgg8`` has one conv
per block; ``vgg11``/``13``/``16``/``19`` follow VGG configurations A/B/D/E. The published models skip ``pool3`` at
32×32 (they apply it only to 64×64 inputs) and so does this one. Each block's ``nn.Sequential`` ends with its last BN;
the ReLU after it is a separate parameter-free module ``acts.<i>``. State-dict keys are the published ones
(``block<i>.<j>`` with conv at 3k and BN at 3k+1, ``classifier``), so the CRD teacher ``vgg13_vanilla`` loads strictly.
The ``vgg*`` names here are the ``vgg*_bn`` models of the reference code.

Features: ``stage_names()`` is ``["acts.0", …, "acts.4"]``, each block after its ReLU (before pooling);
``stage_names(preact=True)`` is ``["acts.0", "block1", …, "block4"]``, the blocks before their ReLU (the stem keeps
its ReLU, as in RepDistiller). The pooled embedding is ``pool4``'s output; the classifier is ``classifier`` (also
readable as ``fc``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.cifar.common import GlobalAvgPool, ZooModel, init_weights
from lightning_kd.models.registry import register_model

CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def vgg_block(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3×3(bias)-BN-ReLU per width, without the last ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    """Five VGG blocks given by ``config`` (each a tuple of conv widths), global average pooling, ``classifier``."""

    classifier_name = "classifier"
    embedding_name = "pool4"

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100, in_chans: int = 3):
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(config):
            self.add_module(f"block{i}", vgg_block(cin, widths))
            cin = widths[-1]
        self.acts = nn.ModuleList(nn.ReLU() for _ in config)
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = GlobalAvgPool()
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self, linear_std=0.01)
        self._stages = [f"acts.{i}" for i in range(5)]
        self._preact_stages = ["acts.0"] + [f"block{i}" for i in range(1, 5)]

    def forward(self, x: Tensor) -> Tensor:
        apply_pool3 = x.shape[2] == 64
        x = self.pool0(self.acts[0](self.block0(x)))
        x = self.pool1(self.acts[1](self.block1(x)))
        x = self.pool2(self.acts[2](self.block2(x)))
        x = self.acts[3](self.block3(x))
        if apply_pool3:
            x = self.pool3(x)
        x = self.acts[4](self.block4(x))
        return self.classifier(self.pool4(x))


@register_model
def vgg8(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-8 with BN (3.97M parameters for CIFAR-100; the usual student of vgg13)."""
    return VGG(CONFIGS["vgg8"], num_classes, in_chans, **kwargs)


@register_model
def vgg11(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-11 with BN (9.28M parameters for CIFAR-100)."""
    return VGG(CONFIGS["vgg11"], num_classes, in_chans, **kwargs)


@register_model
def vgg13(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-13 with BN (9.46M parameters for CIFAR-100; a CRD teacher)."""
    return VGG(CONFIGS["vgg13"], num_classes, in_chans, **kwargs)


@register_model
def vgg16(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-16 with BN (14.77M parameters for CIFAR-100)."""
    return VGG(CONFIGS["vgg16"], num_classes, in_chans, **kwargs)


@register_model
def vgg19(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-19 with BN (20.09M parameters for CIFAR-100)."""
    return VGG(CONFIGS["vgg19"], num_classes, in_chans, **kwargs)
