"""Baselines that generative recommenders are compared against, on the same data and protocol.

- `sasrec`: the SASRec model (flax NNX), its full-softmax next-item loss and jitted steps.
- `train`: training on leave-one-out sequences, validation early stopping, test and popularity metrics.
- `commands`: `neo-jax baseline sasrec`.
"""
