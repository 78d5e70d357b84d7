"""Small training inputs for the train tests: a vocabulary layout, ArrayRecord shards, a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from neo_jax.config import load_config
from neo_jax.tasks.records import WRITER_OPTIONS, TokenizedExample, shard_paths
from neo_jax.tokenizer import LAYOUT_FILE
from neo_jax.train.config import TrainConfig
from neo_jax.vocab import EntityType, VocabLayout


MODEL_TINY = Path(__file__).parent.parent / "configs" / "model_tiny.yaml"
LAYOUT = VocabLayout(text_size=96, entity_types=(EntityType("product", (8, 8)),), pad_multiple=32)


def example(rng: np.random.Generator, layout: VocabLayout = LAYOUT) -> TokenizedExample:
    """A prompt of text ids whose first token decides the SID of the completion (learnable)."""
    prompt = rng.integers(0, layout.text_size, rng.integers(3, 10)).astype(np.int32)
    key = int(prompt[0])
    codes = [layout.sid_token("product", 0, key % 8), layout.sid_token("product", 1, key // 8 % 8)]
    completion = np.array([layout.sid_open_id, *codes, layout.sid_close_id], np.int32)
    return TokenizedExample("recommend", "product", "ids", prompt, completion)


def write_dataset(root: Path, train: int = 96, valid: int = 32, shards: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """`(records_dir, tokenizer_dir)`: train/valid ArrayRecord shards and a directory holding the layout."""
    rng = np.random.default_rng(seed)
    records = root / "records"
    records.mkdir(parents=True)
    for split, count in (("train", train), ("valid", valid)):
        writers = [ArrayRecordWriter(str(p), WRITER_OPTIONS) for p in shard_paths(records, split, shards)]
        for i in range(count):
            writers[i % shards].write(example(rng).to_bytes())
        for writer in writers:
            writer.close()
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / LAYOUT_FILE).write_text(LAYOUT.to_json())
    return records, tokenizer


def tiny_config(root: Path, run_name: str = "run", overrides: tuple[str, ...] = ()) -> TrainConfig:
    """configs/model_tiny.yaml, random, trained a few steps on `write_dataset(root)`'s shards."""
    records, tokenizer = root / "records", root / "tokenizer"
    base = [f"run_dir={root / run_name}", f"data.records_dir={records}", f"data.tokenizer={tokenizer}",
            f"init.model_config={MODEL_TINY}",
            "data.num_shards=2", "data.prefetch_batches=0", "data.read_threads=1",
            "steps=6", "batch_size=8", "seq_len=32", "log_every=1", "eval.every_steps=3", "eval.batches=2",
            "checkpoint.every_steps=3", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=1", "mfu=false"]
    return load_config(TrainConfig, None, base + list(overrides))


def write_catalog_dataset(root: Path, seq_len: int = 128) -> tuple[Path, Path]:
    """`(records_dir, tokenizer_dir)` of the generated default catalog, small: task examples of
    every task, a sentencepiece text model trained on them, SIDs of two levels of 16 codes per
    type (the type-local row index in base 16), train and valid ArrayRecord shards."""
    from neo_jax.catalog.sid_output import sids_tsv
    from neo_jax.tasks.records import write_records
    from neo_jax.data.splits import leave_one_out, split_queries
    from neo_jax.data.synthetic import SynthConfig, generate
    from neo_jax.tasks.builders import TaskConfig, build_eval_examples, build_train_examples, load_sid_map
    from neo_jax.tokenizer import MixedTokenizer, train_sentencepiece

    dataset = generate(SynthConfig(num_items=150, num_users=60, num_queries=20, min_history=4, max_history=8))
    catalog = dataset.catalog
    local_index = np.zeros(len(catalog), np.int64)
    for t in range(len(catalog.type_names)):
        rows = np.flatnonzero(catalog.item_types == t)
        local_index[rows] = np.arange(rows.size)
    codes = np.stack([local_index // 16, local_index % 16], axis=1).astype(np.int32)  # [items, 2]
    root.mkdir(parents=True, exist_ok=True)
    (root / "sids.tsv").write_text(sids_tsv(catalog.item_ids, catalog.type_names, catalog.item_types, codes))
    sid_map = load_sid_map(root / "sids.tsv", catalog)
    config = TaskConfig(max_history=4)
    split = leave_one_out(dataset.interactions.sequences())
    train_queries, _ = split_queries(dataset.queries, 0.1, 0)
    examples = {"train": build_train_examples(dataset, split, sid_map, config, train_queries),
                "valid": build_eval_examples(dataset, split.valid, sid_map, config)}
    texts = [text for e in examples["train"] for text in (e.prompt, e.completion)]
    text_tokenizer = train_sentencepiece(texts, 400, root / "text.model")
    layout = VocabLayout(text_size=text_tokenizer.vocab_size,
                         entity_types=tuple(EntityType(name, (16, 16)) for name in catalog.type_names))
    tokenizer = MixedTokenizer(text_tokenizer, layout)
    tokenizer.save(root / "tokenizer")
    records = root / "records"
    records.mkdir()
    for split_name, split_examples in examples.items():
        write_records(split_examples, records, split_name, tokenizer, num_shards=2,
                      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return records, root / "tokenizer"
