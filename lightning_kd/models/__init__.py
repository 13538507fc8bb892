"""Models by name: ``create_model``, ``list_models``, ``register_model``."""

from lightning_kd.models import small  # noqa: F401  (registers the small models)
from lightning_kd.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
