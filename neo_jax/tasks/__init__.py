"""Task data: what the decoder trains on, built after the catalog's SIDs and the tokenizer.

- `builders`: the prompt schema (header line: task, type, format), templates, `load_sid_map`,
  the task examples (window next-item examples and one prompt per prefix, search, SID<->text,
  profiles, explanations) and the evaluation examples.
- `records`: tokenized examples as ArrayRecord shards, fitted to a length limit.
- `pipeline`: the grain input pipeline (task mix, packing, batching, exact resume).
- `preference`: preference records (a prompt, its chosen and rejected completions, the reference
  model's log-probabilities) and their fixed-shape batches, for the softmax-DPO stage.
"""
