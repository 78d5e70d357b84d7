"""The decoder model: config, layers, KV cache, vocabulary extension and loss."""

from neo_jax.model.config import Llama3RopeScaling, ModelConfig
from neo_jax.model.decoder import MASKED_LOGIT, Decoder
from neo_jax.model.kv_cache import KVCache

__all__ = ["Decoder", "KVCache", "Llama3RopeScaling", "MASKED_LOGIT", "ModelConfig"]
