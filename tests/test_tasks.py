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
from neo_jax.tasks.builders import (ANY_TYPE, DEFAULT_TASKS, TASK_FORMATS, TEMPLATES, PromptHeader, TaskBuilder,
                                    TaskConfig, build_eval_examples, build_train_examples, load_sid_map,
                                    parse_header, random_window_spans, read_examples, render_prompt, window_spans,
                                    write_examples, write_train_examples)
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
    assert {e.task for e in examples} == set(DEFAULT_TASKS)
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
    assert all(len(templates_used[t]) == len(TEMPLATES[t]) for t in DEFAULT_TASKS)  # every phrasing is used
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
    prompt = render_prompt("recommend", "brand", "ids", 0, **builder.history_fields(history))
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


@pytest.mark.parametrize("config", [
    TaskConfig(seed=5, explain_fraction=0.5),  # every default task; explanations drawn
    TaskConfig(tasks=("recommend", "sid_to_text"), window=4, window_sampling="random", avoid_repeats=True, seed=2),
])
def test_streamed_train_examples_are_the_in_memory_ones_line_for_line(dataset, tmp_path, config):
    sid_map = toy_sid_map(dataset.catalog)
    split = leave_one_out(dataset.interactions.sequences())
    examples = build_train_examples(dataset, split, sid_map, config, dataset.queries)
    write_examples(tmp_path / "in_memory.jsonl", examples)
    counts = write_train_examples(tmp_path / "train.jsonl", dataset, split, sid_map, config, dataset.queries)
    assert (tmp_path / "train.jsonl").read_bytes() == (tmp_path / "in_memory.jsonl").read_bytes()
    assert counts == collections.Counter(e.task for e in examples) and len(counts) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_memory.jsonl", "train.jsonl"]  # no scratch left


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


# -- window examples --------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 25))
def test_window_spans_cover_every_item_once_newest_first(length, window):
    spans = window_spans(length, window)
    assert [i for start, end in spans for i in range(start, end)] == list(range(length))
    assert all(0 < end - start <= window for start, end in spans)
    assert all(end - start == window for start, end in spans[1:])  # only the oldest span may be short
    if length:
        assert spans[-1][1] == length


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.integers(2, 25), st.integers(0, 2**31))
def test_random_window_spans_are_as_many_windows_at_seeded_end_points(length, window, seed):
    spans = random_window_spans(length, window, np.random.default_rng(seed))
    assert len(spans) == len(window_spans(length, window))
    assert all(0 <= start < end <= length and end - start == min(window, end) for start, end in spans)
    assert all(end >= min(2, length) for _, end in spans)
    assert spans == random_window_spans(length, window, np.random.default_rng(seed))


def test_random_window_sampling_moves_the_windows_of_the_same_histories(dataset):
    split = leave_one_out(dataset.interactions.sequences())
    sid_map = toy_sid_map(dataset.catalog)
    build = lambda sampling: build_train_examples(dataset, split, sid_map, TaskConfig(
        tasks=("recommend",), window=4, window_sampling=sampling))
    tiled, sampled = build("tile"), build("random")
    assert len(tiled) == len(sampled)
    assert sorted(e.completion for e in tiled) != sorted(e.completion for e in sampled)
    with pytest.raises(UserError, match="unknown window sampling 'every'"):
        TaskConfig(window=4, window_sampling="every")


def test_window_examples_put_every_training_item_in_the_completion(dataset):
    split = leave_one_out(dataset.interactions.sequences())
    sid_map = toy_sid_map(dataset.catalog)
    examples = build_train_examples(dataset, split, sid_map, TaskConfig(tasks=("recommend",), window=4))
    sid_of = {format_sid(*sid_map[r]): r for r in range(len(dataset.catalog))}
    covered = collections.Counter()
    for example in examples:
        header = parse_header(example.prompt)
        assert example.prompt == header.render()  # the header alone: no loss on anything but items
        assert (header.task, header.output_format) == ("recommend", "ids")
        spans = re.findall(r"\[SID\].*?\[/SID\]", example.completion)
        assert "".join(spans) == example.completion and 1 <= len(spans) <= 4
        rows = [sid_of[s] for s in spans]
        types = {dataset.catalog.type_name(r) for r in rows}
        assert header.entity_type == (types.pop() if len(types) == 1 else ANY_TYPE)
        covered.update(rows)
    expected = collections.Counter(int(r) for seq in split.train_sequences for r in seq)
    assert covered == expected  # every training item is a target exactly once an epoch


def test_window_eval_examples_continue_the_training_layout(dataset):
    split = leave_one_out(dataset.interactions.sequences())
    sid_map = toy_sid_map(dataset.catalog)
    config = TaskConfig(tasks=("recommend",), window=5)
    examples = build_eval_examples(dataset, split.test, sid_map, config)
    for seq_example, example in zip(split.test, examples):
        header = PromptHeader("recommend", dataset.catalog.type_name(seq_example.target), "ids")
        recent = seq_example.history[-4:].tolist()
        assert example.prompt == header.render() + "".join(format_sid(*sid_map[r]) for r in recent)
        assert example.completion == format_sid(*sid_map[seq_example.target])
        assert len(example.history) == len(seq_example.history)  # the whole history, for exclusion


@pytest.mark.parametrize("window", [-1, 1])
def test_bad_window_is_refused(window):
    with pytest.raises(UserError, match="window"):
        TaskConfig(window=window)


def test_profiles_use_no_negative_feedback_from_after_the_split_point():
    """user_profile reads only the negatives given before the user's first held-out item."""
    from neo_jax.data.schema import NEGATIVE, POSITIVE, Dataset, Interactions

    titles = ["garden tools"] * 7 + ["early dislike", "between dislike", "late dislike", "tied late dislike",
                                     "tied early dislike", "short dislike"]
    catalog = Catalog([f"i{r}" for r in range(len(titles))], ("product",), np.zeros(len(titles), np.int32),
                      {"title": titles})
    # user 0: positives 0..4 at t=1..5, so training holds 0, 1, 2; item 3 (t=4) is the validation
    # target and item 4 (t=5) the test target. Negatives: 7 at t=2 and 8 at t=3.5 (before the split
    # point), 9 at t=4.5 (after it), 11 at t=4 listed before the validation event (counts as before
    # it, as the time order of ties is file order), 10 at t=4 listed after it (after the split point).
    # user 1: two positives (5, 6), too short to be evaluated: all its negatives are training data.
    events = [(0, 0, 1, POSITIVE), (0, 1, 2, POSITIVE), (0, 7, 2, NEGATIVE), (0, 2, 3, POSITIVE),
              (0, 8, 3.5, NEGATIVE), (0, 11, 4, NEGATIVE), (0, 3, 4, POSITIVE), (0, 10, 4, NEGATIVE),
              (0, 9, 4.5, NEGATIVE), (0, 4, 5, POSITIVE),
              (1, 5, 1, POSITIVE), (1, 6, 2, POSITIVE), (1, 12, 9, NEGATIVE)]
    users, items, times, feedback = (np.array(column) for column in zip(*events))
    interactions = Interactions(["u0", "u1"], users.astype(np.int32), items.astype(np.int32),
                                (times * 10).astype(np.int64), feedback=feedback.astype(np.int8))
    dataset_ = Dataset(catalog, interactions)
    split = leave_one_out(interactions.sequences())
    np.testing.assert_array_equal(split.train_sequences[0], [0, 1, 2])
    kept = interactions.negatives_before([len(s) for s in split.train_sequences])
    np.testing.assert_array_equal(kept[0], [7, 8, 11])
    np.testing.assert_array_equal(kept[1], [12])
    np.testing.assert_array_equal(interactions.negatives()[0], [7, 8, 11, 10, 9])  # what leaked before

    examples = build_train_examples(dataset_, split, toy_sid_map(catalog), TaskConfig(tasks=("user_profile",)))
    profiles = {e.prompt.count("[SID]"): e.completion for e in examples}  # user 0's history is 3 items, 1's 2
    assert profiles[3] == ("This user is interested in garden tools. "
                           "They dislike between dislike, early dislike, tied early dislike.")
    assert profiles[2] == "This user is interested in garden tools. They dislike short dislike."


def test_avoided_spans_name_an_item_of_their_own_window(dataset, tmp_path):
    split = leave_one_out(dataset.interactions.sequences())
    sid_map = toy_sid_map(dataset.catalog)
    config = TaskConfig(tasks=("recommend",), window=4, avoid_repeats=True)
    examples = build_train_examples(dataset, split, sid_map, config)
    plain = build_train_examples(dataset, split, sid_map, TaskConfig(tasks=("recommend",), window=4))
    assert sorted(e.completion for e in examples) == sorted(e.completion for e in plain)  # the same windows
    picked = collections.Counter()
    for example in examples:
        spans = re.findall(r"\[SID\].*?\[/SID\]", example.completion)
        assert example.avoid in spans  # one of the window's own items, whole
        picked[spans.index(example.avoid)] += 1
    assert len(picked) == 4  # the pick is spread over the window, not always its newest item
    assert examples == build_train_examples(dataset, split, sid_map, config)  # seeded
    write_examples(tmp_path / "train.jsonl", examples[:5])
    assert read_examples(tmp_path / "train.jsonl") == examples[:5]
    assert all(not e.avoid for e in plain) and "avoid" not in plain[0].to_dict()


def test_avoided_spans_need_windows():
    with pytest.raises(UserError, match="avoid_repeats needs window"):
        TaskConfig(avoid_repeats=True)
