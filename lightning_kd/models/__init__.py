"""Models by name: ``create_model``, ``list_models``, ``register_model``."""

from lightning_kd.models import cifar, small  # noqa: F401  (register the CIFAR zoo and the small models)
from lightning_kd.models.base import ZooModel
from lightning_kd.models.registry import create_model, list_models, register_model

__all__ = ["ZooModel", "create_model", "list_models", "register_model"]
