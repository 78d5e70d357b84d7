"""Serving bundles: one self-contained, checksummed directory that `neo-jax generate --bundle` serves.

- `bundle`: the bundle's layout, `write_bundle` and `load_bundle` (verified before anything is used).
- `commands`: `neo-jax export CKPT_DIR OUT_DIR`, which gathers a checkpoint's inputs into a bundle.
"""
