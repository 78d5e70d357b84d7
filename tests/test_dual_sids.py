"""Dual tokenization (Align3GR's token level): users get SIDs of their own type beside the items', from
fusion networks trained with the user-to-item alignment loss."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.catalog.commands import SidsBuildConfig, build_sids
from neo_jax.catalog.dual import UserSidConfig, _init, _loss
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.config import load_config
from neo_jax.cli import main
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.errors import UserError
from neo_jax.tasks.builders import (USER_LINE, PromptHeader, TaskBuilder, TaskConfig, load_sid_map, load_user_sids,
                                    read_examples)
from neo_jax.tasks.records import fit_example
from neo_jax.vocab import format_sid

SYNTHETIC = ["embedding.text.dim=32", "embedding.collab.dim=8", "embedding.collab.epochs=1",
             "sids.quantiser.kmeans_iters=5"]
USERS = ["users.enabled=true", "users.codebook_sizes=[8,8]", "users.steps=60", "users.batch_size=64",
         "users.dim=16", "users.hidden=32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data") / "synth"
    assert main(["data", "synth", str(data), "--num-items", "150", "--num-users", "60", "--num-queries", "5"]) == 0
    return data


def build(tmp_path: Path, data: Path, *overrides: str) -> dict:
    return build_sids(load_config(SidsBuildConfig, Path(__file__).parents[1] / "configs" / "sids_synthetic.yaml",
                                  [f"data={data}", f"output={tmp_path / 'out'}", *SYNTHETIC, *overrides]))


@pytest.fixture(scope="module")
def dual(tmp_path_factory, data_dir):
    tmp_path = tmp_path_factory.mktemp("dual")
    return tmp_path, build(tmp_path, data_dir, *USERS)


def test_users_get_distinct_sids_of_their_own_type_after_the_items(dual, data_dir):
    tmp_path, summary = dual
    dataset = load_dataset(data_dir)
    n_items, n_users = len(dataset.catalog), len(dataset.interactions.user_ids)
    assert summary["types"] == ["product", "brand", "creator", "user"]
    assert summary["items"] == n_items + n_users and summary["collision_rate_after"] == 0.0
    user = summary["per_type"]["user"]  # the same figures as every item type
    assert user["items"] == n_users and user["codebook_sizes"][:2] == [8, 8]
    assert set(user) >= {"collision_rate_before", "codebook_use", "prefix_coherence"}
    output = load_sid_output(tmp_path / "out")
    assert output.item_ids == list(dataset.catalog.item_ids) + list(dataset.interactions.user_ids)
    user_type = [t.name for t in output.entity_types].index("user")
    assert (output.trie.item_types[:n_items] != user_type).all()
    assert (output.trie.item_types[n_items:] == user_type).all()
    # the tasks read the item rows and pass over the users'
    sid_map = load_sid_map(tmp_path / "out" / "sids.tsv", dataset.catalog)
    assert len(sid_map) == n_items and {t for t, _ in sid_map.values()} == {"product", "brand", "creator"}


def test_the_fusion_networks_learn_the_alignment(dual):
    _, summary = dual
    fusion = summary["fusion"]
    assert fusion["alignment_loss"][1] < fusion["alignment_loss"][0]
    assert fusion["reconstruction_loss"][1] < fusion["reconstruction_loss"][0]
    assert fusion["valid_users"] > 0 and 0.0 <= fusion["valid_recall@10_fused"] <= 1.0
    assert summary["embedding"]["source"] == "dual" and summary["embedding"]["dim"] == 16


def test_the_same_seed_gives_the_same_user_sids(dual, data_dir, tmp_path):
    first, _ = dual
    build(tmp_path, data_dir, *USERS)
    assert (tmp_path / "out" / "sids.tsv").read_text() == (first / "out" / "sids.tsv").read_text()


def test_in_batch_negatives_leave_out_the_users_own_items():
    """The alignment term is the cross-entropy of each pair's own item against the batch's items that the
    user does not have: masking a column equals dropping it from the softmax."""
    config = UserSidConfig(dim=4, hidden=8, max_items=3, reconstruction_weight=0.0, temperature=0.5)
    inputs = jax.random.normal(jax.random.key(1), (6, 5))
    params = _init(jax.random.key(2), 5, config)
    histories = jnp.array([[0, 1, -1], [2, -1, -1], [3, 4, 5]])
    positives = jnp.array([2, 3, 0])
    owned = jnp.zeros((3, 3), bool).at[0, 2].set(True)  # user 0 has item 0 (pair 2's item)
    masked, _ = _loss(params, inputs, histories, positives, owned, config)
    plain, _ = _loss(params, inputs, histories, positives, jnp.zeros((3, 3), bool), config)
    # pair 0 against its own item and pair 1's only, by hand from the unmasked logits
    from neo_jax.catalog.dual import _fuse, _pool
    logits = np.asarray(_fuse(params["users"], _pool(params["query"], inputs, histories))
                        @ _fuse(params["items"], inputs[positives]).T / config.temperature)
    ce = lambda row, cols, target: -(row[target] - np.log(np.sum(np.exp(row[cols]))))  # noqa: E731
    expected = (ce(logits[0], [0, 1], 0) + ce(logits[1], [0, 1, 2], 1) + ce(logits[2], [0, 1, 2], 2)) / 3
    assert float(masked) == pytest.approx(expected, rel=1e-5) and float(masked) != pytest.approx(float(plain))


def test_pooling_masks_padding_by_index_not_by_value():
    """An item whose input is all zeros still takes attention; -1 entries (padding) take none."""
    from neo_jax.catalog.dual import _pool
    inputs = jnp.array([[0.0, 0.0], [1.0, 1.0]])  # item 0 is the zero vector
    pooled = np.asarray(_pool(jnp.array([1.0, 0.0]), inputs, jnp.array([[0, 1], [1, -1], [-1, -1]])))
    weight = np.exp(1.0) / (1.0 + np.exp(1.0))  # softmax of scores [0, 1]: item 1's share
    np.testing.assert_allclose(pooled, [[weight, weight], [1.0, 1.0], [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["users.entity_type=brand"], "is an entity type of the catalog"),
    (["users.batch_size=1"], "batch_size at least 2"),
    (["users.batch_size=100000"], "fewer than batch_size"),
])
def test_bad_user_settings_are_refused(tmp_path, data_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        build(tmp_path, data_dir, *USERS, *overrides)
    assert not (tmp_path / "out").exists()


def test_behaviour_tasks_name_each_user_by_their_sid(dual, data_dir, tmp_path):
    """`--user-sids`: every next-item prompt (training windows, validation, test) carries its user's SID on
    the line after the header; profile_to_user answers a profile with the user's SID, user_to_profile the
    reverse, the profile built from the user's training items and earlier negative feedback."""
    sids_dir, _ = dual
    out = tmp_path / "tasks"
    assert main(["data", "tasks", str(data_dir), str(sids_dir / "out" / "sids.tsv"), str(out), "--window", "4",
                 "--user-sids", "--tasks", "recommend,profile_to_user,user_to_profile"]) == 0
    dataset = load_dataset(data_dir)
    users = load_user_sids(sids_dir / "out" / "sids.tsv", dataset.catalog, dataset.interactions.user_ids)
    assert users.entity_type == "user" and len(set(users.sids)) == len(users.sids)
    user_of_sid = {sid: user for user, sid in enumerate(users.sids)}
    split = leave_one_out(dataset.interactions.sequences())
    train = read_examples(out / "train.jsonl")
    by_task = {task: [e for e in train if e.task == task] for task in ("recommend", "profile_to_user",
                                                                      "user_to_profile")}
    assert all(by_task.values())
    for example in by_task["recommend"]:
        header, user_line, rest = example.prompt.split("\n", 2)
        assert user_line.startswith(USER_LINE) and user_line[len(USER_LINE):] in user_of_sid and rest == ""
    for name in ("valid", "test"):
        examples = read_examples(out / f"{name}.jsonl")
        targets = split.valid if name == "valid" else split.test
        assert [e.prompt.split("\n")[1] for e in examples] == [USER_LINE + users.sids[t.user] for t in targets]
    builder = TaskBuilder(dataset.catalog, load_sid_map(sids_dir / "out" / "sids.tsv", dataset.catalog),
                          TaskConfig(), np.random.default_rng(0), users)
    negatives = dataset.interactions.negatives_before([len(s) for s in split.train_sequences])
    for example in by_task["profile_to_user"]:
        assert PromptHeader(example.task, "user", "ids").render() == example.prompt.split("\n")[0] + "\n"
        user = user_of_sid[example.completion]
        assert builder.profile_text(split.train_sequences[user][-20:], negatives[user]) in example.prompt
    for example in by_task["user_to_profile"]:
        user = next(u for sid, u in user_of_sid.items() if sid in example.prompt)
        assert example.completion == builder.profile_text(split.train_sequences[user][-20:], negatives[user])
    # a long prompt loses its oldest items when fitted, never the user's line
    tokenizer = _SidCharTokenizer()
    example = read_examples(out / "test.jsonl")[0]
    fitted, fit = fit_example(example, tokenizer, max_length=len(tokenizer.encode(example.prompt)) - 3)
    assert fit.history_items_dropped >= 1
    kept = tokenizer.encode("\n".join(example.prompt.split("\n")[:2]) + "\n")  # the header and the user's line
    assert fitted.prompt[:len(kept)].tolist() == kept


def test_a_user_sid_share_names_the_user_in_that_share_of_training_prompts_and_in_every_evaluation(
        dual, data_dir, tmp_path):
    """`--user-sid-share 0.5`: about half the training windows carry the user's line, drawn with the
    seed; validation and test prompts all do; the windows' items are those of the share-1 run."""
    sids_dir, _ = dual
    argv = ["data", "tasks", str(data_dir), str(sids_dir / "out" / "sids.tsv"), None, "--window", "4", "--user-sids",
            "--tasks", "recommend"]

    def tasks(name: str, *extra: str) -> Path:
        out = tmp_path / name
        assert main([a if a is not None else str(out) for a in argv] + list(extra)) == 0
        return out

    every = tasks("every")
    half, again = (tasks(name, "--user-sid-share", "0.5") for name in ("half", "again"))
    named = [e.prompt.split("\n")[1].startswith(USER_LINE) for e in read_examples(half / "train.jsonl")]
    assert 0.3 < np.mean(named) < 0.7 and len(named) >= 100
    assert all(e.prompt.split("\n")[1].startswith(USER_LINE) for e in read_examples(every / "train.jsonl"))
    assert (half / "train.jsonl").read_text() == (again / "train.jsonl").read_text()  # seeded
    for name in ("valid.jsonl", "test.jsonl"):
        assert (half / name).read_text() == (every / name).read_text()

    def items(out: Path) -> list[str]:
        return sorted(e.completion for e in read_examples(out / "train.jsonl"))

    assert items(half) == items(every)


@pytest.mark.parametrize("extra, message", [(["--user-sids", "--user-sid-share", "0"], "user_sid_share must be"),
                                            (["--user-sid-share", "0.5"], "needs user_sids")])
def test_a_bad_user_sid_share_is_refused(dual, data_dir, tmp_path, capsys, extra, message):
    sids_dir, _ = dual
    code = main(["data", "tasks", str(data_dir), str(sids_dir / "out" / "sids.tsv"), str(tmp_path / "tasks"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "tasks").exists()


class _SidCharTokenizer:
    """One token per SID marker or code, one per other character: enough to measure lengths."""

    def encode(self, text: str) -> list[int]:
        import re
        pieces = re.findall(r"\[/?SID\]|<[^<>]+>|.", text, flags=re.DOTALL)
        return [ord(p) if len(p) == 1 else 0x10000 + sum(map(ord, p)) for p in pieces]


def test_user_prompts_without_user_sids_are_refused(data_dir, tmp_path, capsys):
    build(tmp_path, data_dir)  # items alone
    code = main(["data", "tasks", str(data_dir), str(tmp_path / "out" / "sids.tsv"), str(tmp_path / "tasks"),
                 "--user-sids"])
    assert code == 2 and "need the users' SIDs" in capsys.readouterr().err
    assert not (tmp_path / "tasks").exists()


@pytest.fixture(scope="module")
def user_generator(dual, data_dir, tmp_path_factory, random_decoder):
    """A random decoder over the dual SIDs' vocabulary (items and users), with its tokenizer."""
    from neo_jax.catalog.sid_output import load_sid_output
    from neo_jax.decode.generate import Generator
    from neo_jax.model.config import ModelConfig
    from neo_jax.tokenizer import MixedTokenizer

    sids_dir, _ = dual
    root = tmp_path_factory.mktemp("user_generator")
    assert main(["data", "tasks", str(data_dir), str(sids_dir / "out" / "sids.tsv"), str(root / "tasks"),
                 "--window", "4", "--user-sids", "--tasks", "recommend,profile_to_user,user_to_profile"]) == 0
    assert main(["tokenizer", "build", str(root / "tokenizer"), "--sids", str(sids_dir / "out"), "--train",
                 str(root / "tasks"), "--vocab-size", "400"]) == 0
    tokenizer = MixedTokenizer.load(root / "tokenizer")
    layout = tokenizer.layout
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=layout.padded_size, num_real_tokens=layout.size,
                         hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                         max_position_embeddings=256)
    output = load_sid_output(sids_dir / "out")
    return Generator(random_decoder(config, seed=1), tokenizer, output, tokenizer.eos_id), output


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), asked=st.sampled_from(["product", "user"]))
def test_an_asked_user_is_always_a_user_and_an_asked_item_never_is(user_generator, seed, asked):
    """The decoder's type masks keep user SIDs out of item answers and item SIDs out of user answers,
    whatever the prompt (random histories of items and users, in each ID-mode task)."""
    from neo_jax.decode.generate import DecodeSettings

    generator, output = user_generator
    rng = np.random.default_rng(seed)
    types = np.array([t.name for t in output.entity_types])[output.trie.item_types]  # [rows]
    history = "".join(format_sid(types[r], [c for c in output.trie.codes[r].tolist() if c >= 0])
                      for r in rng.choice(len(types), 5, replace=False).tolist())
    task = "recommend" if asked == "product" else "profile_to_user"
    prompt = PromptHeader(task, asked, "ids").render() + f"History: {history}"
    beams = generator.generate([prompt], DecodeSettings("beam", max_new_tokens=8, beam_size=6))[0]
    assert beams and all(len(b.items) == 1 and b.items[0].entity_type == asked for b in beams)
