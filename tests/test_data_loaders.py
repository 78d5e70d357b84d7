"""Loaders (JSONL, TSV, Amazon 2014), the synthetic dataset, and errors that name file, line and problem."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from neo_jax import cli
from neo_jax.data.loaders import load_dataset, load_embeddings, load_interactions, load_items, load_queries
from neo_jax.data.schema import NEGATIVE, NEUTRAL
from neo_jax.data.synthetic import SynthConfig, generate
from neo_jax.data.writers import write_dataset
from neo_jax.errors import UserError

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon2014"
SMALL = SynthConfig(seed=3, num_items=300, num_users=120, num_queries=40)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def catalog(tmp_path):
    return load_items(write(tmp_path / "items.jsonl", jsonl(
        {"item_id": "a", "entity_type": "product", "title": "Red lipstick", "categories": ["Makeup", "Lips"]},
        {"item_id": "b", "entity_type": "brand", "title": "Acme"},
        {"item_id": "c", "entity_type": "product", "title": "Blue  mascara\n"})))


# -- formats ------------------------------------------------------------------------------

def test_items_jsonl_fields_types_and_text(catalog):
    assert catalog.item_ids == ["a", "b", "c"]
    assert catalog.type_names == ("product", "brand")
    np.testing.assert_array_equal(catalog.item_types, [0, 1, 0])
    assert catalog.texts["categories"] == ["Makeup, Lips", "", ""]
    assert catalog.texts["title"][2] == "Blue mascara"  # whitespace collapsed
    assert catalog.item_text(0) == "title: Red lipstick | categories: Makeup, Lips"
    assert catalog.embeddings is None


def test_items_tsv_default_type_and_inline_embeddings(tmp_path):
    catalog = load_items(write(tmp_path / "items.tsv",
                               "item_id\ttitle\tembedding\nx\tOne\t[1, 2]\ny\tTwo\t[3.5, 4]\n"))
    assert catalog.type_names == ("item",)
    np.testing.assert_allclose(catalog.embeddings, [[1, 2], [3.5, 4]])
    assert catalog.embeddings.dtype == np.float32


@pytest.mark.parametrize("name", ["items.jsonl", "items.tsv"])
def test_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path, name):
    text = (jsonl({"item_id": "x", "title": "One"}, {"item_id": "y", "title": "Two"}) if name.endswith(".jsonl")
            else "item_id\ttitle\nx\tOne\ny\tTwo\n")
    catalog = load_items(write(tmp_path / name, b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")))
    assert catalog.item_ids == ["x", "y"] and catalog.texts["title"] == ["One", "Two"]


def test_interactions_time_order_feedback_and_iso_dates(tmp_path, catalog):
    events = load_interactions(write(tmp_path / "interactions.tsv",
                                     "user_id\titem_id\ttimestamp\tfeedback\trating\n"
                                     "u1\tc\t2024-01-03\t\t5\n"
                                     "u1\ta\t2024-01-01T10:00:00\tpositive\t4\n"
                                     "u2\tb\t5\tnegative\t1\n"
                                     "u1\tb\t2024-01-02\t-1\t\n"), catalog)
    assert events.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in events.sequences()] == [[0, 2], []]
    assert [s.tolist() for s in events.negatives()] == [[1], [1]]
    assert events.feedback.tolist().count(NEGATIVE) == 2
    assert np.isnan(events.ratings[3]) and events.ratings[0] == 5


def test_queries_jsonl_and_tsv(tmp_path, catalog):
    from_jsonl = load_queries(write(tmp_path / "q.jsonl", jsonl({"query": "red lips", "item_ids": ["a", "c"]})),
                              catalog)
    from_tsv = load_queries(write(tmp_path / "q.tsv", "query\titem_ids\nred lips\ta c\n"), catalog)
    for queries in (from_jsonl, from_tsv):
        assert queries.texts == ["red lips"] and queries.relevant[0].tolist() == [0, 2]


def test_embeddings_from_npy_with_id_file(tmp_path, catalog):
    np.save(tmp_path / "e.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    write(tmp_path / "ids.txt", "c\na\nb\n")
    with_embeddings = load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog, expected_dim=2)
    np.testing.assert_array_equal(with_embeddings.embeddings, [[2, 3], [4, 5], [0, 1]])
    assert with_embeddings.embeddings.dtype == np.float32


def test_embeddings_in_catalog_order_stay_memory_mapped(tmp_path, catalog):
    values = np.arange(6, dtype=np.float16).reshape(3, 2)
    np.save(tmp_path / "e.npy", values)
    write(tmp_path / "ids.txt", "".join(f"{item_id}\n" for item_id in catalog.item_ids))
    loaded = load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog).embeddings
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.float16  # not read, not copied
    np.testing.assert_array_equal(loaded, values)


@pytest.mark.skipif(not (AMAZON / "beauty").is_dir(), reason="the shared Amazon 2014 copy is not present")
def test_amazon2014_beauty_layout():
    dataset = load_dataset(AMAZON / "beauty")
    catalog, events = dataset.catalog, dataset.interactions
    assert (len(catalog), events.num_users, len(events)) == (12101, 22363, 198502)
    assert catalog.type_names == ("product",)
    assert list(catalog.texts) == ["attributes", "keywords"]
    assert catalog.texts["attributes"][0] == "OPI; Makeup; Nails; Nail Polish"
    sequences = events.sequences()
    assert sequences[0].tolist() == [0, 1, 2, 3, 4]  # line `1 1 2 3 4 5`, 1-based ids
    assert catalog.item_ids[sequences[1][5]] == "4"  # user 2 returns to item 4
    assert min(len(s) for s in sequences) == 5
    assert events.user_ids[:2] == ["u1", "u2"]  # named apart from the items, which share the numbers


# -- the synthetic dataset -------------------------------------------------------------------

def test_synthetic_is_seeded_and_multi_type():
    first, again, other = generate(SMALL), generate(SMALL), generate(SynthConfig(seed=4, num_items=300,
                                                                                  num_users=120, num_queries=40))
    assert first.catalog.texts == again.catalog.texts
    np.testing.assert_array_equal(first.interactions.items, again.interactions.items)
    assert not np.array_equal(first.interactions.items[:50], other.interactions.items[:50])
    assert first.catalog.type_names == ("product", "brand", "creator")
    assert len(first.catalog) == 300 and first.interactions.num_users == 120 and len(first.queries) == 40
    assert (first.interactions.feedback == NEGATIVE).any()
    assert all(len(r) >= 1 for r in first.queries.relevant)


def test_neutral_feedback_is_generated_apart_and_survives_the_files(tmp_path):
    """Neutral events (rating 3) come from a random stream of their own: without them the dataset's
    histories and negative events are the same; written and loaded back, they stay neutral."""
    with_neutral, without = generate(SMALL), generate(dataclasses.replace(SMALL, neutral_prob=0.0))
    events = with_neutral.interactions
    neutral = events.feedback == NEUTRAL
    assert neutral.any() and (events.ratings[neutral] == 3.0).all()
    for a, b in zip(events.sequences(), without.interactions.sequences()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(events.negatives(), without.interactions.negatives()):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "data").mkdir()
    write_dataset(with_neutral, tmp_path / "data")
    loaded = load_dataset(tmp_path / "data").interactions
    assert int((loaded.feedback == NEUTRAL).sum()) == int(neutral.sum())


def test_synthetic_histories_follow_tastes():
    """Consecutive liked items share a topic far more often than chance (1 in 12)."""
    dataset = generate(SMALL)
    topic = np.array(dataset.catalog.texts["categories"])
    pairs = [(a, b) for s in dataset.interactions.sequences() for a, b in zip(s[:-1], s[1:])]
    same_topic = np.mean([topic[a] == topic[b] for a, b in pairs])
    assert same_topic > 0.45
    negatives = dataset.interactions.negatives()
    liked_topics = [set(topic[s]) for s in dataset.interactions.sequences()]
    disliked_in_taste = np.mean([topic[n] in liked_topics[u] for u, ns in enumerate(negatives) for n in ns])
    assert disliked_in_taste < 0.2


def test_synthetic_queries_describe_their_items():
    dataset = generate(SMALL)
    texts = dataset.catalog.texts
    for query, relevant in zip(dataset.queries.texts, dataset.queries.relevant):
        for row in relevant:
            if " for " in query:  # "<kind> for <topic>" or "<type>s for <topic>"
                head, topic = query.rsplit(" for ", 1)
                assert topic in texts["description"][row]
                assert head in texts["title"][row] or head == dataset.catalog.type_name(row) + "s"
            else:  # "<adjective> <kind>" or "<brand> <kind>"
                assert set(query.split()) <= set(texts["title"][row].split())


def test_synthetic_round_trips_through_the_loaders(tmp_path):
    dataset = generate(SMALL)
    write_dataset(dataset, tmp_path)
    loaded = load_dataset(tmp_path)
    assert loaded.catalog.item_ids == dataset.catalog.item_ids
    assert loaded.catalog.texts == {k: v for k, v in dataset.catalog.texts.items()}
    np.testing.assert_array_equal(loaded.catalog.item_types, dataset.catalog.item_types)
    for mine, theirs in zip(loaded.interactions.sequences(), dataset.interactions.sequences()):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(loaded.interactions.feedback, dataset.interactions.feedback)
    assert loaded.queries.texts == dataset.queries.texts


def test_synth_command_writes_atomically(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["data", "synth", str(out), "--num-items", "300", "--num-users", "50", "--num-queries", "10"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 300 and summary["users"] == 50
    assert cli.main(["data", "check", str(out)]) == 0
    assert cli.main(args) == 2  # exists: refused, nothing touched
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


# -- bad input --------------------------------------------------------------------------------

ITEMS = jsonl({"item_id": "a", "title": "A"}, {"item_id": "b", "title": "B"})
BAD_ITEMS = {
    "missing_column": ("items.jsonl", jsonl({"item_id": "a"}, {"title": "no id"}), r"items.jsonl:2: missing column"),
    "duplicate_id": ("items.jsonl", jsonl({"item_id": "a"}, {"item_id": "b"}, {"item_id": "a"}),
                     r"items.jsonl:3: duplicate item id 'a' \(first on line 1\)"),
    "non_utf8": ("items.tsv", b"item_id\ttitle\nx\tcaf\xe9\n", r"items.tsv:2: not valid UTF-8 .*byte 0xe9"),
    "embedding_width": ("items.jsonl", jsonl({"item_id": "a", "embedding": [1, 2, 3]},
                                             {"item_id": "b", "embedding": [1, 2]}),
                        r"items.jsonl:2: embedding has width 2, earlier items have 3"),
    "embedding_missing": ("items.jsonl", jsonl({"item_id": "a", "embedding": [1]}, {"item_id": "b"}),
                          r"items.jsonl:2: item 'b' has no embedding"),
    "tsv_fields": ("items.tsv", "item_id\ttitle\nx\ty\tz\n", r"items.tsv:2: 3 tab-separated fields, the header has 2"),
    "bad_json": ("items.jsonl", '{"item_id": "a"}\n{"item_id": \n', r"items.jsonl:2: not valid JSON"),
    "no_items": ("items.jsonl", "\n", r"items.jsonl: no items"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_items_name_file_line_and_problem(tmp_path, case):
    name, content, message = BAD_ITEMS[case]
    with pytest.raises(UserError, match=message):
        load_items(write(tmp_path / name, content))


BAD_INTERACTIONS = {
    "missing_column": (jsonl({"user_id": "u", "item_id": "a"}), r"interactions.jsonl:1: missing column.*timestamp"),
    "unknown_item": (jsonl({"user_id": "u", "item_id": "a", "timestamp": 1},
                           {"user_id": "u", "item_id": "zz", "timestamp": 2}),
                     r"interactions.jsonl:2: unknown item 'zz'"),
    "bad_timestamp": (jsonl({"user_id": "u", "item_id": "a", "timestamp": "yesterday"}),
                      r"interactions.jsonl:1: timestamp 'yesterday'"),
    "bad_feedback": (jsonl({"user_id": "u", "item_id": "a", "timestamp": 1, "feedback": "meh"}),
                     r"interactions.jsonl:1: feedback 'meh'"),
    "non_utf8": (b'{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "\xff"}\n',
                 r"interactions.jsonl:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INTERACTIONS))
def test_bad_interactions_name_file_line_and_problem(tmp_path, case):
    content, message = BAD_INTERACTIONS[case]
    catalog = load_items(write(tmp_path / "items.jsonl", ITEMS))
    with pytest.raises(UserError, match=message):
        load_interactions(write(tmp_path / "interactions.jsonl", content), catalog)


def test_bad_queries(tmp_path):
    catalog = load_items(write(tmp_path / "items.jsonl", ITEMS))
    with pytest.raises(UserError, match=r"q.jsonl:1: query 'x' has no relevant items"):
        load_queries(write(tmp_path / "q.jsonl", jsonl({"query": "x", "item_ids": []})), catalog)
    with pytest.raises(UserError, match=r"q.tsv:2: unknown item 'zz'"):
        load_queries(write(tmp_path / "q.tsv", "query\titem_ids\nx\ta zz\n"), catalog)


def test_bad_npy_embeddings(tmp_path):
    catalog = load_items(write(tmp_path / "items.jsonl", ITEMS))
    np.save(tmp_path / "e.npy", np.zeros((2, 4), np.float32))
    write(tmp_path / "ids.txt", "a\nb\n")
    with pytest.raises(UserError, match=r"e.npy: embeddings have width 4, expected 8"):
        load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog, expected_dim=8)
    write(tmp_path / "ids.txt", "a\nq\n")
    with pytest.raises(UserError, match=r"ids.txt:2: unknown item id 'q'"):
        load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog)
    write(tmp_path / "ids.txt", "a\n")
    with pytest.raises(UserError, match=r"ids.txt: 1 ids for 2 rows"):
        load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog)
    write(tmp_path / "ids.txt", "a\na\n")
    with pytest.raises(UserError, match=r"ids.txt: item id 'a' is listed 2 times"):
        load_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt", catalog)


def test_amazon_layout_errors(tmp_path):
    write(tmp_path / "items.tsv", "item_id\tasin\tidgenrec_keywords\n1\tA1\tred\n2\tA2\tblue\n")
    write(tmp_path / "sequences.txt", "1 1 2\n2\n")
    with pytest.raises(UserError, match=r"sequences.txt:2: user '2' has an empty history"):
        load_dataset(tmp_path)
    write(tmp_path / "sequences.txt", "1 1 2\n2 2 3\n")
    with pytest.raises(UserError, match=r"sequences.txt:2: unknown item '3'"):
        load_dataset(tmp_path)


def test_check_command_reports_bad_input_in_one_line(tmp_path, capsys):
    write(tmp_path / "items.jsonl", ITEMS)
    write(tmp_path / "interactions.jsonl", jsonl({"user_id": "u", "item_id": "nope", "timestamp": 1}))
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "interactions.jsonl:1: unknown item 'nope'" in err and "\n" not in err


def test_tasks_command_leaves_no_partial_output(tmp_path):
    dataset_dir = tmp_path / "data"
    dataset_dir.mkdir()
    write_dataset(generate(SMALL), dataset_dir)
    write(tmp_path / "sids.tsv", "item_id\tentity_type\tlevel_0\np00000\tproduct\t0\n")
    assert cli.main(["data", "tasks", str(dataset_dir), str(tmp_path / "sids.tsv"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sids.tsv"]



def test_tasks_command_refuses_data_with_no_user_of_three_items(tmp_path, capsys):
    write(tmp_path / "items.jsonl", ITEMS)
    write(tmp_path / "interactions.jsonl", jsonl({"user_id": "u", "item_id": "a", "timestamp": 1},
                                                 {"user_id": "u", "item_id": "b", "timestamp": 2}))
    write(tmp_path / "sids.tsv", "item_id\tentity_type\tlevel_0\na\titem\t0\nb\titem\t1\n")
    assert cli.main(["data", "tasks", str(tmp_path), str(tmp_path / "sids.tsv"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no valid or test examples" in err and "0 of 1 users" in err and "\n" not in err
    assert not (tmp_path / "out").exists()

# -- the download script, with its downloads served locally -------------------------------------

def test_fetch_script_writes_the_loader_layout(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "fetch_amazon2014", Path(__file__).resolve().parents[1] / "data_tools" / "fetch_amazon2014.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    meta = "\n".join(repr(m) for m in [
        {"asin": "B1", "brand": "OPI", "categories": [["Beauty", "Makeup", "Nails"]]},
        {"asin": "B2", "categories": [["Beauty", "Skin Care"], ["Beauty", "Makeup"]]},
        {"asin": "B9", "brand": "other"}])
    served = {
        fetch.S3REC.format(name="Beauty"): b"1 1 2\n2 2 1 2\n",
        fetch.P5_DATAMAPS.format(name="beauty"): json.dumps({"item2id": {"B1": "1", "B2": "2"}}).encode(),
        fetch.IDGENREC.format(name="Beauty"): b"B1 nail lacquer red\nB2\n",
        fetch.UCSD_META.format(name="Beauty"): gzip.compress(meta.encode()),
    }
    monkeypatch.setattr(fetch, "download", served.__getitem__)
    fetch.fetch("beauty", tmp_path / "beauty")
    dataset = load_dataset(tmp_path / "beauty")
    assert dataset.catalog.texts == {"attributes": ["OPI; Makeup; Nails", "Skin Care; Makeup"],
                                     "keywords": ["nail lacquer red", ""]}
    assert [s.tolist() for s in dataset.interactions.sequences()] == [[0, 1], [1, 0, 1]]
