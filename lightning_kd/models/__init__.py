"""Models by name: ``create_model``, ``list_models``, ``register_model``."""

from lightning_kd.models import cifar, small  # noqa: F401  (register the CIFAR zoo and the small models)
from lightning_kd.models.base import ZooModel
from lightning_kd.models.registry import create_model, list_models, register_model
from lightning_kd.models.hf import (
    check_vocab,
    final_hidden_states,
    is_hf_name,
    lm_head,
    lm_vocab_size,
    load_hf_model,
    tiny_causal_lm,
    tiny_encoder,
)

__all__ = ["ZooModel", "create_model", "list_models", "register_model", "check_vocab", "final_hidden_states",
           "is_hf_name", "lm_head", "lm_vocab_size", "load_hf_model", "tiny_causal_lm", "tiny_encoder"]
