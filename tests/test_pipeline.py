"""ArrayRecord shards and the grain pipeline: packing, loss masks, sharding, seeding, checkpoint/restore."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import grain
import numpy as np
import pytest

from neo_jax import cli
from neo_jax.errors import UserError
from neo_jax.tasks.builders import TaskExample
from neo_jax.tasks.pipeline import BATCH_KEYS, PipelineConfig, make_iterator
from neo_jax.tasks.records import TokenizedExample, record_paths, tokenize_example, write_records

BOS, EOS = 1, 2


class ByteTokenizer:
    """Bytes shifted past bos/eos: enough to check what the pipeline does with token ids."""

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids).decode("utf-8")


def make_examples(n: int) -> list[TaskExample]:
    return [TaskExample("recommend", "product", "ids", f"prompt {i} " + "x" * (i % 7), f"answer {i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("records")
    summary = write_records(make_examples(60), directory, "train", ByteTokenizer(), num_shards=3,
                            bos_id=BOS, eos_id=EOS)
    assert (summary.examples, summary.shards) == (60, 3)
    return record_paths(directory, "train")


@contextlib.contextmanager
def iterator(paths, config, **kwargs):
    it = make_iterator(paths, config, **kwargs)
    try:
        yield it
    finally:
        it.close()


def completions_in(batch) -> list[str]:
    """The completion of every segment: its loss-masked targets, minus the final eos."""
    found = []
    for row in range(batch["tokens"].shape[0]):
        for segment in np.unique(batch["segment_ids"][row]):
            if segment == 0:
                continue
            in_segment = batch["segment_ids"][row] == segment  # [seq_len]
            targets = batch["targets"][row][in_segment & (batch["loss_mask"][row] == 1)]
            assert targets[-1] == EOS
            found.append(ByteTokenizer().decode(targets[:-1]))
    return found


def one_epoch(paths, config, **kwargs) -> list[dict]:
    with iterator(paths, config, **kwargs) as it:
        return list(it)


def test_records_round_trip(shards):
    source = grain.sources.ArrayRecordDataSource(shards)
    assert len(source) == 60
    decoded = {TokenizedExample.from_bytes(source[i]).completion.tobytes() for i in range(len(source))}
    expected = {tokenize_example(e, ByteTokenizer(), BOS, EOS).completion.tobytes() for e in make_examples(60)}
    assert decoded == expected
    first = TokenizedExample.from_bytes(source[0])
    assert first.prompt[0] == BOS and first.completion[-1] == EOS and first.task == "recommend"


def test_batches_are_packed_with_a_completion_loss_mask(shards):
    config = PipelineConfig(seq_len=64, batch_size=4, num_epochs=1, drop_remainder=False)
    batches = one_epoch(shards, config)
    for batch in batches:
        assert sorted(batch) == sorted(BATCH_KEYS)
        assert all(batch[k].shape == batch["tokens"].shape and batch[k].shape[1] == 64 for k in BATCH_KEYS)
        assert batch["loss_mask"].dtype == np.float32 and batch["tokens"].dtype == np.int32
        real = batch["segment_ids"] > 0
        assert not batch["loss_mask"][~real].any()  # padding never counts
        # within a segment targets are the next tokens and positions count from 0
        same_segment = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & real[:, 1:]
        np.testing.assert_array_equal(batch["targets"][:, :-1][same_segment], batch["tokens"][:, 1:][same_segment])
        starts = real & (batch["positions"] == 0)
        assert (batch["tokens"][starts] == BOS).all()
    segments_per_row = [len(set(row.tolist()) - {0}) for b in batches for row in b["segment_ids"]]
    assert sum(segments_per_row) == 60 and max(segments_per_row) > 1  # every example once, several per row
    assert sorted(c for b in batches for c in completions_in(b)) == sorted(e.completion for e in make_examples(60))


def test_long_examples_are_truncated_to_seq_len(tmp_path):
    long = [TaskExample("search", "brand", "ids", "p" * 50, "c" * 50)]
    write_records(long, tmp_path, "train", ByteTokenizer(), bos_id=BOS, eos_id=EOS)
    config = PipelineConfig(seq_len=80, batch_size=1, num_epochs=1, shuffle=False)
    (batch,) = one_epoch(record_paths(tmp_path, "train"), config)
    assert (batch["segment_ids"] == 1).all()
    assert batch["loss_mask"].sum() == 80 - 50  # prompt with bos is 51 tokens: targets 50..79 are completion


def test_process_shards_are_disjoint_and_complete(shards):
    config = PipelineConfig(seq_len=64, batch_size=2, num_epochs=1, drop_remainder=False)
    seen = [sorted(c for b in one_epoch(shards, config, shard_index=i, shard_count=2) for c in completions_in(b))
            for i in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(e.completion for e in make_examples(60))
    with pytest.raises(UserError, match="shard_index 2"):
        make_iterator(shards, config, shard_index=2, shard_count=2)


def test_shuffling_is_seeded(shards):
    def order(seed):
        config = PipelineConfig(seq_len=64, batch_size=2, num_epochs=1, seed=seed, drop_remainder=False)
        return [c for b in one_epoch(shards, config) for c in completions_in(b)]

    assert order(3) == order(3)
    assert order(3) != order(4)


def test_restore_mid_epoch_gives_the_same_batches(shards):
    config = PipelineConfig(seq_len=48, batch_size=2, num_epochs=None, seed=7)
    with iterator(shards, config) as it:
        for _ in range(5):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(20)]  # runs past the end of the first epoch
    state = json.loads(json.dumps(state))  # the state is plain data, as a checkpoint stores it
    with iterator(shards, config) as restored:
        restored.set_state(state)
        for want in expected:
            got = next(restored)
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture(scope="module")
def two_task_shards(tmp_path_factory):
    """45 examples of task b and 15 of task a (a natural mix of 1:3), completions naming their task."""
    directory = tmp_path_factory.mktemp("two_tasks")
    examples = [TaskExample("a" if i % 4 == 0 else "b", "product", "ids", f"p{i}", f"{'a' if i % 4 == 0 else 'b'}{i}")
                for i in range(60)]
    write_records(examples, directory, "train", ByteTokenizer(), num_shards=2, bos_id=BOS, eos_id=EOS)
    return record_paths(directory, "train")


def task_shares(paths, config, batches: int) -> dict[str, int]:
    with iterator(paths, config) as it:
        completions = [c for _ in range(batches) for c in completions_in(next(it))]
    return {task: sum(c.startswith(task) for c in completions) for task in ("a", "b")}


def test_task_weights_set_the_mix(two_task_shards):
    config = PipelineConfig(seq_len=32, batch_size=4, seed=1, task_weights={"a": 3, "b": 1})
    shares = task_shares(two_task_shards, config, batches=40)  # task a's 15 records repeat many times
    assert sum(shares.values()) > 300
    assert shares["a"] / shares["b"] == pytest.approx(3.0, rel=0.05)


def test_no_task_weights_keep_the_records_mix(two_task_shards):
    config = PipelineConfig(seq_len=32, batch_size=4, num_epochs=1, drop_remainder=False)
    assert task_shares(two_task_shards, config, batches=len(one_epoch(two_task_shards, config))) == {"a": 15,
                                                                                                    "b": 45}


def test_a_zero_weight_leaves_a_task_out_and_the_mix_resumes_exactly(two_task_shards):
    config = PipelineConfig(seq_len=32, batch_size=4, seed=2, task_weights={"a": 1, "b": 0})
    assert task_shares(two_task_shards, config, batches=10)["b"] == 0
    mixed = dataclasses.replace(config, task_weights={"a": 1, "b": 2})
    with iterator(two_task_shards, mixed) as it:
        for _ in range(7):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(10)]
    with iterator(two_task_shards, mixed) as restored:
        restored.set_state(state)
        for want in expected:
            np.testing.assert_array_equal(next(restored)["tokens"], want["tokens"])


@pytest.mark.parametrize("weights, message", [
    ({"a": 1, "c": 1}, r"task\(s\) \['c'\].*its tasks are \['a', 'b'\]"),
    ({"a": -1, "b": 2}, "non-negative"),
    ({"a": 0}, "not all zero"),
])
def test_bad_task_weights_are_refused(two_task_shards, weights, message):
    with pytest.raises(UserError, match=message):
        make_iterator(two_task_shards, PipelineConfig(seq_len=32, batch_size=4, task_weights=weights))


def test_commands_from_synthetic_data_to_batches(tmp_path):
    """`data synth` -> sids.tsv -> `data tasks` -> `data records` (sentencepiece + SID tokens) -> batches."""
    from neo_jax.data.loaders import load_dataset
    from neo_jax.tokenizer import MixedTokenizer, SentencePieceTokenizer
    from neo_jax.vocab import EntityType, VocabLayout

    assert cli.main(["data", "synth", str(tmp_path / "data"), "--num-items", "150", "--num-users", "40",
                     "--num-queries", "10"]) == 0
    catalog = load_dataset(tmp_path / "data").catalog
    rows = [f"{catalog.item_ids[r]}\t{catalog.type_name(r)}\t{r % 8}\t{r // 8}\n" for r in range(len(catalog))]
    (tmp_path / "sids.tsv").write_text("item_id\tentity_type\tlevel_0\tlevel_1\n" + "".join(rows))
    text = SentencePieceTokenizer.from_file("/work/shared/data/tokenizers/mistral_v1_32k.model")
    layout = VocabLayout(text.vocab_size, tuple(EntityType(t, (8, 32)) for t in catalog.type_names))
    MixedTokenizer(text, layout).save(tmp_path / "tokenizer")
    assert cli.main(["data", "tasks", str(tmp_path / "data"), str(tmp_path / "sids.tsv"), str(tmp_path / "ex"),
                     "--tasks", "recommend,text_to_sid"]) == 0
    assert cli.main(["data", "records", str(tmp_path / "ex"), str(tmp_path / "tokenizer"), str(tmp_path / "rec"),
                     "--shards", "2"]) == 0
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert summary["splits"]["test"]["examples"] == 40
    config = PipelineConfig(seq_len=256, batch_size=2, num_epochs=1)
    with iterator(record_paths(tmp_path / "rec", "train"), config) as it:
        batch = next(it)
    completion_targets = batch["targets"][batch["loss_mask"] == 1]
    assert (completion_targets >= layout.sid_start).any()  # SID code tokens are learned
    assert layout.sid_close_id in completion_targets and text.eos_id in completion_targets


def test_window_example_loss_covers_every_item_span_and_no_header(tmp_path):
    from neo_jax.tasks.builders import PromptHeader, TaskBuilder, TaskConfig
    from neo_jax.data.schema import Catalog
    from neo_jax.vocab import format_sid

    catalog = Catalog(["a", "b", "c"], ("product",), np.zeros(3, np.int32), {"title": ["x", "y", "z"]})
    sid_map = {r: ("product", (r, 2 - r)) for r in range(3)}
    builder = TaskBuilder(catalog, sid_map, TaskConfig(window=3), np.random.default_rng(0))
    example = builder.window(np.array([2, 0, 1]))
    write_records([example], tmp_path, "train", ByteTokenizer(), bos_id=BOS, eos_id=EOS)
    config = PipelineConfig(seq_len=256, batch_size=1, num_epochs=1, shuffle=False)
    (batch,) = one_epoch(record_paths(tmp_path, "train"), config)
    header = PromptHeader("recommend", "product", "ids").render()
    masked = batch["targets"][0][batch["loss_mask"][0] == 1]
    assert ByteTokenizer().decode(masked[:-1]) == "".join(format_sid(*sid_map[r]) for r in (2, 0, 1))
    assert masked[-1] == EOS
    # every target before the first item is header (or bos) and carries no loss
    unmasked = (batch["loss_mask"][0] == 0) & (batch["segment_ids"][0] == 1)
    assert unmasked.sum() == len(ByteTokenizer().encode(header))


def test_an_avoided_span_follows_the_completion_with_a_negative_loss_mask(tmp_path):
    from neo_jax.tasks.builders import TaskBuilder, TaskConfig
    from neo_jax.data.schema import Catalog
    from neo_jax.vocab import format_sid

    catalog = Catalog(["a", "b", "c"], ("product",), np.zeros(3, np.int32), {"title": ["x", "y", "z"]})
    sid_map = {r: ("product", (r, 2 - r)) for r in range(3)}
    builder = TaskBuilder(catalog, sid_map, TaskConfig(window=3, avoid_repeats=True), np.random.default_rng(0))
    example = builder.window(np.array([2, 0, 1]))
    write_records([example], tmp_path, "train", ByteTokenizer(), bos_id=BOS, eos_id=EOS)
    config = PipelineConfig(seq_len=256, batch_size=1, num_epochs=1, shuffle=False)
    (batch,) = one_epoch(record_paths(tmp_path, "train"), config)
    mask, targets = batch["loss_mask"][0], batch["targets"][0]
    learned, avoided = targets[mask == 1], targets[mask == -1]
    assert ByteTokenizer().decode(learned[:-1]) == "".join(format_sid(*sid_map[r]) for r in (2, 0, 1))
    assert learned[-1] == EOS  # the end is learned, after the avoided span
    assert example.avoid in {format_sid(*sid_map[r]) for r in (2, 0, 1)}
    assert ByteTokenizer().decode(avoided) == example.avoid
    # prompt, the window's items, the avoided span, the eos: each one run of positions
    real = mask[batch["segment_ids"][0] == 1]
    runs = [int(v) for i, v in enumerate(real) if i == 0 or v != real[i - 1]]
    assert runs == [0, 1, -1, 1]
