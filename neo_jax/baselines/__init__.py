"""Baselines that generative recommenders are compared against, on the same data and protocol.

- `sasrec`: the SASRec model (flax NNX), its full-softmax next-item loss and jitted steps.
- `train`: training on leave-one-out sequences, validation early stopping, test and popularity metrics.
- `popularity`: the most-frequent-training-items baseline (per entity type, optional history exclusion),
  the one implementation behind every popularity figure (SASRec reports, quickstart, `baseline popularity`).
- `transition`: first-order next-item counts of the newest two history items (weights 1.0 / 0.3),
  popularity breaking ties.
- `commands`: `neo-jax baseline sasrec|transition|popularity`.
"""
