"""From a user's files to training batches.

- `schema`: `Catalog`, `Interactions`, `Queries`, `Dataset`.
- `loaders`: JSONL / TSV / Amazon 2014 readers (`load_dataset`); `writers`: the JSONL writer.
- `synthetic`: the generated multi-type default dataset.
- `splits`: leave-one-out (TIGER protocol); `tasks`: prompt schema, templates, `load_sid_map`.
- `records`: tokenized examples as ArrayRecord shards; `pipeline`: grain packing and batching.
- `commands`: `neo-jax data synth | check | tasks | records`.
"""
