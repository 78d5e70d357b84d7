"""neo_jax: a JAX/TPU-native stack for generative recommendation with semantic IDs."""

__version__ = "0.1.0"
