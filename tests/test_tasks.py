"""Leave-one-out splits never leak a target into training; task examples carry the prompt schema."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.data.schema import Catalog, Queries
from neo_jax.data.splits import MIN_EVAL_LENGTH, leave_one_out, split_queries
from neo_jax.data.synthetic import SynthConfig, generate
from neo_jax.data.tasks import (ANY_TYPE, TASK_FORMATS, TASKS, TEMPLATES, PromptHeader, TaskBuilder, TaskConfig,
                                build_eval_examples, build_train_examples, load_sid_map, parse_header,
                                read_examples, write_examples)
from neo_jax.errors import UserError
from neo_jax.vocab import SID_CODE_PATTERN, format_sid

SMALL = SynthConfig(seed=1, num_items=300, num_users=150, num_queries=60)


@pytest.fixture(scope="module")
def dataset():
    return generate(SMALL)


def toy_sid_map(catalog: Catalog) -> dict[int, tuple[str, tuple[int, ...]]]:
    """A distinct SID per item: its row's base-8 digits, typed."""
    return {r: (catalog.type_name(r), (r // 64, (r // 8) % 8, r % 8)) for r in range(len(catalog))}


# -- splits -----------------------------------------------------------------------------------

sequences_strategy = st.lists(st.lists(st.integers(0, 30), min_size=0, max_size=12), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(sequences_strategy)
def test_leave_one_out_positions(raw):
    sequences = [np.array(s, np.int32) for s in raw]
    split = leave_one_out(sequences)
    eval_users = [u for u, s in enumerate(sequences) if len(s) >= MIN_EVAL_LENGTH]
    assert [e.user for e in split.valid] == eval_users == [e.user for e in split.test]
    for v, t in zip(split.valid, split.test):
        s = sequences[v.user]
        assert (v.position, v.target, t.position, t.target) == (len(s) - 2, s[-2], len(s) - 1, s[-1])
        np.testing.assert_array_equal(t.history, s[:-1])
        np.testing.assert_array_equal(v.history, s[:-2])
    held_out_from = {u: len(sequences[u]) - 2 for u in eval_users}  # first held-out position per user
    for e in split.train:
        s = sequences[e.user]
        limit = held_out_from.get(e.user, len(s))
        assert 1 <= e.position < limit  # the target and its whole history precede the held-out items
        assert e.target == s[e.position]
        np.testing.assert_array_equal(e.history, s[: e.position])
    expected = sum(len(s) - 3 if len(s) >= MIN_EVAL_LENGTH else max(len(s) - 1, 0) for s in sequences)
    assert len(split.train) == expected  # every training prefix is used
    for u, part in enumerate(split.train_sequences):
        np.testing.assert_array_equal(part, sequences[u][: held_out_from.get(u, len(sequences[u]))])


def test_no_validation_or_test_item_in_training(dataset):
    """On the synthetic data (no repeats within a user) held-out items never appear in a user's training data."""
    sequences = dataset.interactions.sequences()
    split = leave_one_out(sequences)
    held_out = collections.defaultdict(set)
    for e in split.valid + split.test:
        held_out[e.user].add(e.target)
    assert len(held_out) == len(sequences)
    for e in split.train:
        assert e.target not in held_out[e.user]
        assert not held_out[e.user] & set(e.history.tolist())
    for u, part in enumerate(split.train_sequences):
        assert not held_out[u] & set(part.tolist())


def test_split_queries_keeps_equal_texts_together():
    queries = Queries(["a", "b", "a", "c", "d", "e", "f", "g", "h", "i"], [np.array([i]) for i in range(10)])
    train, test = split_queries(queries, 0.3, seed=0)
    assert len(train) + len(test) == 10 and not set(train.texts) & set(test.texts)
    assert len(set(test.texts)) == 3
    assert split_queries(queries, 0.3, seed=0)[1].texts == test.texts
    with pytest.raises(UserError, match="fraction"):
        split_queries(queries, 1.0, seed=0)


# -- the prompt schema and task examples ---------------------------------------------------------

def template_index(task: str, body: str) -> int:
    """Which template of `task` produced `body` (the prompt after its header)."""
    matches = [i for i, template in enumerate(TEMPLATES[task])
               if re.fullmatch(re.sub(r"\\\{\w+\\\}", "(.*)", re.escape(template)), body, flags=re.S)]
    assert len(matches) == 1, (task, body)
    return matches[0]


def test_examples_carry_the_schema_fields(dataset):
    sid_map = toy_sid_map(dataset.catalog)
    split = leave_one_out(dataset.interactions.sequences())
    examples = build_train_examples(dataset, split, sid_map, TaskConfig(seed=0), dataset.queries)
    assert {e.task for e in examples} == set(TASKS)
    templates_used = collections.defaultdict(set)
    for e in examples:
        header = parse_header(e.prompt)
        assert (header.task, header.entity_type, header.output_format) == (e.task, e.entity_type, e.output_format)
        assert e.output_format in TASK_FORMATS[e.task]
        assert e.entity_type in dataset.catalog.type_names or (e.task == "user_profile" and e.entity_type == ANY_TYPE)
        templates_used[e.task].add(template_index(e.task, e.prompt.split("\n", 1)[1]))
        sids_out = SID_CODE_PATTERN.findall(e.completion)
        if e.output_format == "ids":  # the completion is exactly one SID of the target type
            assert re.fullmatch(r"\[SID\](<[^<>]+>)+\[/SID\]", e.completion)
            assert {t for t, _, _ in sids_out} == {e.entity_type}
        if e.output_format == "text":
            assert not sids_out
    assert all(len(templates_used[t]) == len(TEMPLATES[t]) for t in TASKS)  # every phrasing is used
    formats = collections.Counter((e.task, e.output_format) for e in examples if e.task == "recommend")
    assert set(f for _, f in formats) == {"ids", "mixed", "text"}


def test_recommend_completion_is_the_target(dataset):
    sid_map = toy_sid_map(dataset.catalog)
    builder = TaskBuilder(dataset.catalog, sid_map, TaskConfig(max_history=3), np.random.default_rng(0))
    history, target = np.array([5, 9, 200, 17]), 250
    example = builder.recommend(history, target, output_format="mixed", template=1)
    assert example.completion == f"{format_sid(*sid_map[target])} {dataset.catalog.title(target)}"
    assert example.prompt.startswith(PromptHeader("recommend", dataset.catalog.type_name(target), "mixed").render())
    shown = [format_sid(*sid_map[r]) for r in history[-3:]]
    assert ", ".join(shown) in example.prompt and format_sid(*sid_map[5]) not in example.prompt
    prompt = builder.prompt("recommend", "brand", "ids", 0, **builder.history_fields(history))
    assert parse_header(prompt) == PromptHeader("recommend", "brand", "ids")


def test_eval_examples_predict_the_held_out_item(dataset):
    sid_map = toy_sid_map(dataset.catalog)
    split = leave_one_out(dataset.interactions.sequences())
    test = build_eval_examples(dataset, split.test, sid_map, TaskConfig())
    assert len(test) == len(split.test)
    for example, held_out in zip(test, split.test):
        assert example.completion == format_sid(*sid_map[held_out.target])
        assert example.output_format == "ids" and template_index("recommend", example.prompt.split("\n", 1)[1]) == 0
        assert example.history == tuple(dataset.catalog.item_ids[r] for r in held_out.history.tolist())


def test_eval_histories_round_trip_and_bad_ones_are_named(dataset, tmp_path):
    split = leave_one_out(dataset.interactions.sequences())
    valid = build_eval_examples(dataset, split.valid, toy_sid_map(dataset.catalog), TaskConfig())
    write_examples(tmp_path / "valid.jsonl", valid)
    assert read_examples(tmp_path / "valid.jsonl") == valid
    record = dict(valid[0].to_dict(), history="p1 p2")
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: 'history' must be a list of item ids"):
        read_examples(tmp_path / "bad.jsonl")


def test_explanations_and_profiles_are_grounded(dataset):
    sid_map = toy_sid_map(dataset.catalog)
    builder = TaskBuilder(dataset.catalog, sid_map, TaskConfig(), np.random.default_rng(0))
    sequence = dataset.interactions.sequences()[0]
    example = builder.explain(sequence[:-1], int(sequence[-1]))
    if example is not None:
        cited = SID_CODE_PATTERN.findall(example.completion)
        assert example.completion.startswith(format_sid(*sid_map[int(sequence[-1])]))
        assert len(cited) == 2 * len(sid_map[0][1])  # the target and one history item
    profile = builder.profile_text(sequence, np.array([], np.int64))
    assert profile.startswith("This user is interested in ")
    categories = {p.lower() for r in sequence for p in dataset.catalog.texts["categories"][r].split(" > ")}
    named = profile.removeprefix("This user is interested in ").rstrip(".").split(", ")
    assert set(named) & categories


def test_examples_are_seeded(dataset, tmp_path):
    sid_map = toy_sid_map(dataset.catalog)
    split = leave_one_out(dataset.interactions.sequences())
    first = build_train_examples(dataset, split, sid_map, TaskConfig(seed=5), dataset.queries)
    again = build_train_examples(dataset, split, sid_map, TaskConfig(seed=5), dataset.queries)
    other = build_train_examples(dataset, split, sid_map, TaskConfig(seed=6), dataset.queries)
    assert first == again and first != other
    write_examples(tmp_path / "train.jsonl", first)
    assert read_examples(tmp_path / "train.jsonl") == first


def test_task_selection_and_bad_config(dataset):
    sid_map = toy_sid_map(dataset.catalog)
    split = leave_one_out(dataset.interactions.sequences())
    only = build_train_examples(dataset, split, sid_map, TaskConfig(tasks=("sid_to_type",)), dataset.queries)
    assert len(only) == len(dataset.catalog) and {e.completion for e in only} == set(dataset.catalog.type_names)
    with pytest.raises(UserError, match="unknown task"):
        TaskConfig(tasks=("recommend", "dance"))
    with pytest.raises(UserError, match="does not start with a header"):
        parse_header("recommend something")


# -- sids.tsv ---------------------------------------------------------------------------------

def write_sids(path, rows):
    path.write_text("item_id\tentity_type\tlevel_0\tlevel_1\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_catalog():
    return Catalog(["a", "b", "c"], ("product", "brand"), np.array([0, 1, 0], np.int32), {"title": ["A", "B", "C"]})


def test_load_sid_map(tmp_path, tiny_catalog):
    path = write_sids(tmp_path / "sids.tsv", [("c", "product", "1", "2"), ("a", "product", "0", "7"),
                                              ("b", "brand", "3", "")])
    assert load_sid_map(path, tiny_catalog) == {0: ("product", (0, 7)), 1: ("brand", (3,)), 2: ("product", (1, 2))}


@pytest.mark.parametrize("rows, message", [
    ([("a", "product", "0", "1"), ("zz", "brand", "0", "1")], r"sids.tsv:3: unknown item id 'zz'"),
    ([("a", "product", "0", "1"), ("b", "product", "0", "1")], r"sids.tsv:3: item 'b' has entity type 'product'"),
    ([("a", "product", "0", "x")], r"sids.tsv:2: SID codes must be non-negative integers"),
    ([("a", "product", "0", "1"), ("a", "product", "0", "2")], r"sids.tsv:3: item 'a' has a second SID"),
    ([("a", "product", "0", "1"), ("b", "brand", "0", "1")], r"sids.tsv: no SID for 1 catalog item\(s\), e.g. 'c'"),
])
def test_bad_sid_map(tmp_path, tiny_catalog, rows, message):
    with pytest.raises(UserError, match=message):
        load_sid_map(write_sids(tmp_path / "sids.tsv", rows), tiny_catalog)
