"""Fitting examples to a length limit when writing records: drop the oldest history items, never
cut the completion or the header (`neo_jax.tasks.records.fit_example`, `write_records(max_length=...)`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grain
import numpy as np
import pytest

from neo_jax import cli
from neo_jax.data.schema import Catalog
from neo_jax.errors import UserError
from neo_jax.tasks.builders import TaskBuilder, TaskConfig, TaskExample, write_examples
from neo_jax.tasks.pipeline import PipelineConfig, make_iterator
from neo_jax.tasks import records as records_module
from neo_jax.tasks.records import Fit, TokenizedExample, fit_example, record_paths, tokenize_example, write_records

BOS, EOS = 1, 2
_SID_PIECES = re.compile(r"\[SID\]|\[/SID\]|<[^<>\s]+_\d+_\d+>")


class SidByteTokenizer:
    """Like MixedTokenizer: `[SID]`, `[/SID]` and each SID code are one token each; text is one
    token per byte (shifted past bos/eos)."""

    def __init__(self):
        self.pieces: list[str] = []  # ids 1000, 1001, ...

    def encode(self, text: str) -> list[int]:
        ids, position = [], 0
        for match in _SID_PIECES.finditer(text):
            ids += [b + 3 for b in text[position:match.start()].encode("utf-8")]
            if match.group(0) not in self.pieces:
                self.pieces.append(match.group(0))
            ids.append(1000 + self.pieces.index(match.group(0)))
            position = match.end()
        return ids + [b + 3 for b in text[position:].encode("utf-8")]

    def decode(self, ids) -> str:
        out, text = [], bytearray()
        for i in (int(i) for i in ids):
            if i >= 1000:
                out.append(text.decode("utf-8"))
                text = bytearray()
                out.append(self.pieces[i - 1000])
            else:
                text.append(i - 3)
        return "".join(out) + text.decode("utf-8")


def make_builder(n_items: int = 30) -> TaskBuilder:
    catalog = Catalog([f"i{r}" for r in range(n_items)], ("product",), np.zeros(n_items, np.int32),
                      {"title": [f"Title of item {r}, a fine thing" for r in range(n_items)]})
    sid_map = {r: ("product", (r % 8, r // 8, r % 3)) for r in range(n_items)}
    return TaskBuilder(catalog, sid_map, TaskConfig(max_history=20), np.random.default_rng(0))


def length(example: TaskExample, tokenizer) -> int:
    record = tokenize_example(example, tokenizer, BOS, EOS)
    return record.prompt.size + record.completion.size


HISTORY = np.arange(20)  # items 0 .. 19, oldest first
TARGET = 25


@pytest.mark.parametrize("template,output_format", [(0, "ids"), (1, "mixed"), (2, "mixed"), (2, "text")])
def test_long_history_keeps_its_newest_items_and_the_whole_completion(template, output_format):
    builder, tokenizer = make_builder(), SidByteTokenizer()
    example = builder.recommend(HISTORY, TARGET, output_format, template)
    # The limit that the newest 13 items fit exactly: 7 items must go, 6 would not be enough.
    shorter = builder.recommend(HISTORY[7:], TARGET, output_format, template)
    limit = length(shorter, tokenizer)
    assert length(builder.recommend(HISTORY[6:], TARGET, output_format, template), tokenizer) > limit
    record, fit = fit_example(example, tokenizer, BOS, EOS, max_length=limit)
    assert fit == Fit(history_items_dropped=7, prompt_cut=False) and fit.shortened
    assert record.prompt.size + record.completion.size == limit
    assert record.prompt[0] == BOS and record.completion[-1] == EOS
    prompt = tokenizer.decode(record.prompt[1:])
    assert prompt == shorter.prompt  # exactly the prompt of items 7 .. 19, header and template text intact
    assert prompt.split("\n")[0] == example.prompt.split("\n")[0] == \
        f"task: recommend | type: product | format: {output_format}"
    kept = [builder.sid(r) for r in range(20) if builder.sid(r) in prompt]
    assert kept == [builder.sid(r) for r in range(7, 20)]
    assert tokenizer.decode(record.completion[:-1]) == example.completion


def test_an_example_that_fits_is_unchanged():
    builder, tokenizer = make_builder(), SidByteTokenizer()
    example = builder.recommend(HISTORY, TARGET, "mixed", 2)
    plain = tokenize_example(example, tokenizer, BOS, EOS)
    for limit in (0, length(example, tokenizer), length(example, tokenizer) + 100):
        record, fit = fit_example(example, tokenizer, BOS, EOS, max_length=limit)
        assert fit == Fit() and not fit.shortened
        np.testing.assert_array_equal(record.prompt, plain.prompt)
        np.testing.assert_array_equal(record.completion, plain.completion)


def test_without_items_to_drop_the_prompt_start_is_cut_after_the_header():
    builder, tokenizer = make_builder(), SidByteTokenizer()
    example = builder.sid_to_text(3)  # one SID (the described item): nothing to drop
    example = TaskExample(example.task, example.entity_type, example.output_format, example.prompt,
                          example.completion + " and a long description" * 3)
    header, body = example.prompt.split("\n", 1)
    header_ids = [BOS] + tokenizer.encode(header + "\n")
    completion = tokenizer.encode(example.completion) + [EOS]
    limit = len(header_ids) + len(completion) + 10
    record, fit = fit_example(example, tokenizer, BOS, EOS, max_length=limit)
    assert fit == Fit(history_items_dropped=0, prompt_cut=True)
    assert record.prompt.tolist() == header_ids + tokenizer.encode(body)[-10:]
    assert record.completion.tolist() == completion

    # A history whose newest item alone is still too long: the other items go, then the start is cut.
    example = builder.recommend(HISTORY[:3], TARGET, "text", 2)
    header = example.prompt.split("\n", 1)[0] + "\n"
    completion = tokenizer.encode(example.completion) + [EOS]
    limit = len([BOS] + tokenizer.encode(header)) + len(completion) + 5
    record, fit = fit_example(example, tokenizer, BOS, EOS, max_length=limit)
    assert fit == Fit(history_items_dropped=2, prompt_cut=True)
    assert record.prompt.size + record.completion.size == limit
    assert tokenizer.decode(record.prompt[1:]).startswith(header)
    assert record.completion.tolist() == completion


def test_write_records_counts_what_was_shortened(tmp_path):
    builder, tokenizer = make_builder(), SidByteTokenizer()
    fits = builder.recommend(HISTORY[17:], TARGET, "ids", 0)
    long = builder.recommend(HISTORY, TARGET, "ids", 0)
    limit = length(builder.recommend(HISTORY[5:], TARGET, "ids", 0), tokenizer)  # 5 items too many
    described = builder.sid_to_text(4)
    header = described.prompt.split("\n")[0] + "\n"
    room = limit - 1 - len(tokenizer.encode(header)) - 5  # leaves 5 prompt tokens after bos + header
    described = TaskExample(described.task, described.entity_type, described.output_format, described.prompt,
                            "x" * (room - 1))  # + eos
    examples = [fits, long, described, long]
    summary = write_records(examples, tmp_path, "train", tokenizer, num_shards=2, bos_id=BOS, eos_id=EOS,
                            max_length=limit)
    assert (summary.examples, summary.length_limit, summary.max_length) == (4, limit, limit)
    assert (summary.history_items_dropped, summary.examples_shortened, summary.prompts_cut) == (10, 3, 1)
    assert summary.to_dict()["history_items_dropped"] == 10
    source = grain.sources.ArrayRecordDataSource(record_paths(tmp_path, "train"))
    records = [TokenizedExample.from_bytes(source[i]) for i in range(len(source))]
    assert all(r.prompt.size + r.completion.size <= limit for r in records)
    assert sorted(tokenizer.decode(r.completion[:-1]) for r in records) == sorted(e.completion for e in examples)

    # The pipeline at seq_len = limit - 1 then supervises every completion token: nothing is cut there.
    config = PipelineConfig(seq_len=limit - 1, batch_size=1, num_epochs=1, shuffle=False, drop_remainder=False)
    it = make_iterator(record_paths(tmp_path, "train"), config)
    try:
        supervised = sum(int(batch["loss_mask"].sum()) for batch in it)
    finally:
        it.close()
    assert supervised == sum(r.completion.size for r in records)


def test_a_completion_that_cannot_fit_is_an_error(tmp_path):
    builder, tokenizer = make_builder(), SidByteTokenizer()
    described = builder.sid_to_text(4)
    too_long = TaskExample(described.task, described.entity_type, described.output_format, described.prompt,
                           "y" * 200)
    with pytest.raises(UserError, match=r"example 1 \(sid_to_text\) cannot fit max_length 150.*completion alone "
                                        r"is 201 tokens"):
        write_records([builder.sid_to_text(3), too_long], tmp_path, "train", tokenizer, bos_id=BOS, eos_id=EOS,
                      max_length=150)
    with pytest.raises(UserError, match="max_length must be 0"):
        write_records([described], tmp_path / "other", "train", tokenizer, max_length=-1)


TEXT_MODEL = Path("/work/shared/data/tokenizers/mistral_v1_32k.model")


@pytest.mark.skipif(not TEXT_MODEL.exists(), reason="needs the shared sentencepiece model")
def test_records_command_fits_examples_with_the_mixed_tokenizer(tmp_path, monkeypatch):
    from neo_jax.tokenizer import MixedTokenizer, SentencePieceTokenizer
    from neo_jax.vocab import EntityType, VocabLayout

    builder = make_builder()
    text = SentencePieceTokenizer.from_file(str(TEXT_MODEL))
    tokenizer = MixedTokenizer(text, VocabLayout(text.vocab_size, (EntityType("product", (8, 4, 3)),)))
    tokenizer.save(tmp_path / "tokenizer")
    lengths = [n for n in (2, 10, 20) for _ in range(4)]
    examples = [builder.recommend(HISTORY[:n], TARGET, fmt, template)
                for n in (2, 10, 20) for fmt in ("ids", "mixed") for template in (0, 2)]
    (tmp_path / "ex").mkdir()
    write_examples(tmp_path / "ex" / "train.jsonl", examples)
    limit = 160
    assert cli.main(["data", "records", str(tmp_path / "ex"), str(tmp_path / "tokenizer"), str(tmp_path / "rec"),
                     "--shards", "1", "--splits", "train", "--max-length", str(limit)]) == 0
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())["splits"]["train"]
    assert summary["length_limit"] == limit and summary["max_length"] <= limit
    assert summary["examples_shortened"] > 0 and summary["history_items_dropped"] > 0
    assert summary["prompts_cut"] == 0
    source = grain.sources.ArrayRecordDataSource(record_paths(tmp_path / "rec", "train"))
    for i, (example, n) in enumerate(zip(examples, lengths)):
        record = TokenizedExample.from_bytes(source[i])
        assert record.prompt.size + record.completion.size <= limit
        assert tokenizer.decode(record.completion[:-1]) == example.completion
        prompt = tokenizer.decode(record.prompt[1:])
        assert prompt.split("\n")[0] == example.prompt.split("\n")[0]
        assert builder.sid(n - 1) in prompt  # the newest item stays
        if record.prompt.size + record.completion.size < len(tokenizer.encode(example.prompt + example.completion)):
            assert builder.sid(0) not in prompt  # the oldest went first

    # Tokenized in two worker processes, several chunks each: the same records in the same order.
    monkeypatch.setattr(records_module, "WORKER_CHUNK", 5)
    assert cli.main(["data", "records", str(tmp_path / "ex"), str(tmp_path / "tokenizer"), str(tmp_path / "rec2"),
                     "--shards", "1", "--splits", "train", "--max-length", str(limit), "--workers", "2"]) == 0
    assert json.loads((tmp_path / "rec2" / "summary.json").read_text())["splits"]["train"] == summary
    parallel = grain.sources.ArrayRecordDataSource(record_paths(tmp_path / "rec2", "train"))
    assert [parallel[i] for i in range(len(parallel))] == [source[i] for i in range(len(source))]


def test_an_avoided_span_is_kept_whole_after_the_completion_with_the_eos():
    tokenizer = SidByteTokenizer()
    builder = make_builder()
    example = TaskExample("recommend", "product", "ids", "task: recommend | type: product | format: ids\n"
                          + "".join(builder.sid(r) for r in HISTORY), builder.sid(TARGET), avoid=builder.sid(3))
    record, fit = fit_example(example, tokenizer, BOS, EOS, max_length=60)
    assert tokenizer.decode(record.completion) == builder.sid(TARGET)  # no eos: it ends the example
    assert tokenizer.decode(record.avoid) == builder.sid(3) and record.end.tolist() == [EOS]
    assert record.length <= 60 and fit.history_items_dropped > 0
    again = TokenizedExample.from_bytes(record.to_bytes())
    assert (again.avoid.tolist(), again.end.tolist()) == (record.avoid.tolist(), record.end.tolist())
    with pytest.raises(UserError, match="cannot fit"):
        fit_example(example, tokenizer, BOS, EOS, max_length=record.length - record.prompt.size + 5)
