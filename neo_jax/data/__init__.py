"""A user's files before the catalog: schema, readers and splits.

- `schema`: `Catalog`, `Interactions`, `Queries`, `Dataset`.
- `loaders`: JSONL / TSV / Amazon 2014 readers (`load_dataset`); `writers`: the JSONL writer.
- `synthetic`: the generated multi-type default dataset.
- `splits`: leave-one-out (TIGER protocol) and held-out queries.
- `commands`: `neo-jax data synth | check | tasks | records` (the last two write the task data of
  `neo_jax.tasks`, which comes after the catalog and tokenizer in the data path).
"""
