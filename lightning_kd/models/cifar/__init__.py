"""The CIFAR model zoo of CRD/RepDistiller and mdistiller, under their names and with their state-dict keys.

Importing this package registers ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
``resnet110``, ``resnet8x4``, ``resnet32x4`` (:mod:`.resnet`), ``ResNet18``, ``ResNet50``
(:mod:`.resnet_imagenet_style`), ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (:mod:`.wrn`), ``vgg8``,
``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (:mod:`.vgg`, the BatchNorm variants), ``MobileNetV2`` (:mod:`.mobilenetv2`,
the half-width ``mobile_half``), ``ShuffleV1`` and ``ShuffleV2`` (:mod:`.shufflenet`). Every factory takes
``num_classes`` (default 100) and ``in_chans`` (default 3). The public teachers' ``<name>_vanilla/ckpt_epoch_240.pth``
(weights under ``"model"``) load strictly, e.g. with :func:`lightning_kd.methods.base.load_weights`. ``forward``
returns logits only; at 32×32 input the logits equal the published models'.

Feature access, the same for every zoo model (see :class:`.common.ZooModel`):

* ``model.stage_names()``: names, as in ``named_modules()``, of the modules whose forward outputs are the stage
  features (the stem, then each stage), in the order of RepDistiller's ``is_feat=True`` list without the pooled
  embedding; hook them with forward hooks. ``model.stage_names(preact=True)``: the same with each stage taken before
  its final ReLU (RepDistiller's ``preact=True``). Each family's module docstring says where its ReLUs are.
* ``model.embedding_name``: the module whose output is the pooled ``(N, C)`` embedding the classifier reads.
* ``model.classifier_name`` and ``model.get_classifier()``: the final ``nn.Linear`` (``fc``, ``linear``,
  ``classifier`` or ``classifier.0``, as published).

The modules added for this (``nn.Identity`` ``preact`` hooks, ReLUs, pooling) have no parameters or buffers, so the
state-dict keys stay the published ones.

>>> import torch
>>> from lightning_kd.models import create_model
>>> model = create_model("resnet8x4", num_classes=100)
>>> model.stage_names()
['relu', 'layer1', 'layer2', 'layer3']
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 100])
"""

from lightning_kd.models.cifar import mobilenetv2, resnet, resnet_imagenet_style, shufflenet, vgg, wrn  # noqa: F401
from lightning_kd.models.cifar.common import ZooModel

__all__ = ["ZooModel"]
