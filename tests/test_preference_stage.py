"""The preference stage of `neo-jax train`: preference records as fixed-shape batches (a group a row,
each completion a branch of its prompt), the softmax-DPO objective against a forward pass of every
candidate on its own, and exact resume of a
stage killed with SIGKILL (no chance to save) between checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from neo_jax.catalog.item_ids import ItemIds
from neo_jax.catalog.table import build_trie
from neo_jax.checkpoint import load_model
from neo_jax.config import MeshConfig, load_config
from neo_jax.errors import UserError
from neo_jax.model import Decoder, ModelConfig
from neo_jax.sharding import make_mesh
from neo_jax.tasks.preference import (PREFERENCE_KEYS, PreferenceExample, preference_features,
                                      write_preference_records)
from neo_jax.tokenizer import LAYOUT_FILE
from neo_jax.train.config import LoraConfig, TrainConfig
from neo_jax.train.monitor import read_metrics
from neo_jax.train.stages import make_plan
from neo_jax.train.step import preference_objective
from neo_jax.train.trainer import train
from test_preference import numpy_softmax_dpo
from train_fixtures import LAYOUT, MODEL_TINY

SETTINGS = ("steps=6", "eval.every_steps=2", "checkpoint.every_steps=2", "mesh.data=2", "mesh.fsdp=2",
            "mesh.tensor=2", "dropout=0.1", "preference.chosen_nll=0.5")


def sid_tokens(key: int) -> np.ndarray:
    """The SID of item `key` (0..63) as the records write it: open, two codes, close."""
    return np.array([LAYOUT.sid_open_id, LAYOUT.sid_token("product", 0, key % 8),
                     LAYOUT.sid_token("product", 1, key // 8 % 8), LAYOUT.sid_close_id], np.int32)


def group(rng: np.random.Generator) -> PreferenceExample:
    """A prompt whose first token names the chosen item, 1-3 other items rejected, made-up reference values."""
    prompt = rng.integers(0, LAYOUT.text_size, rng.integers(3, 10)).astype(np.int32)
    chosen = int(prompt[0]) % 64
    others = rng.choice(np.setdiff1d(np.arange(64), [chosen]), rng.integers(1, 4), replace=False)
    completions = tuple(sid_tokens(k) for k in [chosen, *others.tolist()])
    return PreferenceExample("recommend", "product", "ids", prompt, completions,
                             rng.normal(-6.0, 1.0, len(completions)).astype(np.float32))


def write_groups(root: Path, train_groups: int = 48, valid_groups: int = 16) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train_groups), ("valid", valid_groups)):
        write_preference_records([group(rng) for _ in range(count)], root / "records", split, num_shards=2)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / LAYOUT_FILE).write_text(LAYOUT.to_json())


def preference_config(root: Path, run_name: str, overrides: tuple[str, ...] = ()) -> TrainConfig:
    base = [f"run_dir={root / run_name}", "stage=preference", f"data.records_dir={root / 'records'}",
            f"data.tokenizer={root / 'tokenizer'}", f"init.model_config={MODEL_TINY}", "data.num_shards=2",
            "data.prefetch_batches=0", "data.read_threads=1", "batch_size=8", "seq_len=32", "log_every=1",
            "eval.batches=2", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=1", "mfu=false"]
    return load_config(TrainConfig, None, base + list(overrides))


def test_a_group_becomes_one_row_the_prompt_once_and_each_completion_a_branch_of_it():
    example = PreferenceExample("recommend", "product", "ids", np.array([1, 2, 3], np.int32),
                                (sid_tokens(5), sid_tokens(9)), np.array([-2.0, -3.0], np.float32))
    again = PreferenceExample.from_bytes(example.to_bytes())
    np.testing.assert_array_equal(again.prompt, example.prompt)
    assert [c.tolist() for c in again.completions] == [c.tolist() for c in example.completions]
    np.testing.assert_array_equal(again.reference, example.reference)
    features = preference_features(example.to_bytes(), seq_len=12, candidates=3)
    assert sorted(features) == sorted(PREFERENCE_KEYS)
    first, second = example.completions
    np.testing.assert_array_equal(features["tokens"], [1, 2, 3, *first[:-1], 3, *second[:-1], 0, 0])
    np.testing.assert_array_equal(features["targets"][:10], [2, 3, *first, *second])
    np.testing.assert_array_equal(features["loss_mask"], [0, 0] + [1] * 8 + [0, 0])
    np.testing.assert_array_equal(features["branch_ids"], [0, 0] + [1] * 4 + [2] * 4 + [0, 0])
    np.testing.assert_array_equal(features["segment_ids"], [1] * 10 + [0, 0])
    # each branch goes on from the prompt's last position, as a row of its own would
    np.testing.assert_array_equal(features["positions"][:10], [0, 1, 2, 3, 4, 5, 2, 3, 4, 5])
    np.testing.assert_array_equal(features["candidates"], [True, True, False])
    np.testing.assert_array_equal(features["reference"], [-2.0, -3.0, 0.0])


def test_every_branch_carries_the_item_ids_of_its_own_row():
    """A prompt that ends with a `[/SID]` opens every branch with it: each branch's copy names the
    prompt's item, as in a row `prompt + completion` of its own, not the item of the branch before."""
    codes = np.array([[k % 8, k // 8 % 8] for k in range(64)], np.int32)
    item_ids = ItemIds.build(build_trie(codes, np.zeros(64, np.int64), (2,)), LAYOUT)
    prompt = np.concatenate([[1, 2], sid_tokens(3), [4], sid_tokens(7)]).astype(np.int32)
    example = PreferenceExample("recommend", "product", "ids", prompt, tuple(sid_tokens(k) for k in (5, 9, 12)),
                                np.zeros(3, np.float32))
    features = preference_features(example.to_bytes(), seq_len=32, candidates=3, item_ids=item_ids)
    for slot, completion in enumerate(example.completions):
        own_row = item_ids(np.concatenate([prompt, completion[:-1]]))  # [prompt + completion - 1]
        np.testing.assert_array_equal(features["item_ids"][:prompt.size - 1], own_row[:prompt.size - 1])
        np.testing.assert_array_equal(features["item_ids"][features["branch_ids"] == slot + 1],
                                      own_row[prompt.size - 1:])
        assert features["item_ids"][features["branch_ids"] == slot + 1][0] == 1 + 7  # the prompt's last item


def test_a_group_too_long_or_with_too_many_completions_is_refused_clearly():
    example = PreferenceExample("recommend", "product", "ids", np.arange(20, dtype=np.int32),
                                (sid_tokens(1), sid_tokens(2)), np.zeros(2, np.float32))
    with pytest.raises(UserError, match="27 tokens.*raise seq_len"):  # 19 of the prompt, 4 a completion
        preference_features(example.to_bytes(), seq_len=26, candidates=2)
    with pytest.raises(UserError, match="more than the 1 candidates"):
        preference_features(example.to_bytes(), seq_len=32, candidates=1)
    with pytest.raises(UserError, match="at least one rejected"):
        PreferenceExample("recommend", "product", "ids", np.arange(3, dtype=np.int32), (sid_tokens(1),),
                          np.zeros(1, np.float32))


def candidate_log_prob_by_itself(model: Decoder, prompt: np.ndarray, completion: np.ndarray) -> float:
    """log p(completion | prompt) from one unpadded forward pass and a numpy log-softmax."""
    sequence = np.concatenate([prompt, completion])
    tokens = jnp.asarray(sequence[None, :-1])
    hidden, _ = model.hidden_states(tokens, jnp.arange(tokens.shape[1])[None], jnp.ones_like(tokens))
    logits = np.asarray(model.logits(hidden), np.float64)[0]  # [len, vocab]
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    positions = np.arange(prompt.size - 1, sequence.size - 1)
    return float(log_probs[positions, sequence[positions + 1]].sum())


def test_the_objective_is_softmax_dpo_of_each_candidate_scored_on_its_own():
    config = load_config(ModelConfig, MODEL_TINY, [f"vocab_size={LAYOUT.padded_size}",
                                                   f"num_real_tokens={LAYOUT.size}"])
    model = Decoder(config, nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    plan = make_plan("preference", LoraConfig(), LAYOUT)
    trainable, frozen = plan.split(nnx.to_pure_dict(state), jax.random.key(0))
    rng = np.random.default_rng(4)
    groups = [group(rng) for _ in range(5)]
    features = [preference_features(g.to_bytes(), 32, 4) for g in groups]
    batch = {key: jnp.asarray(np.stack([f[key] for f in features])) for key in PREFERENCE_KEYS}
    beta, chosen_nll = 0.7, 0.5
    objective, sums = preference_objective(graphdef, plan, beta, chosen_nll)(trainable, frozen, batch, None)

    scores = np.full((5, 4), -1e9)
    for i, g in enumerate(groups):
        for c, completion in enumerate(g.completions):
            scores[i, c] = candidate_log_prob_by_itself(model, g.prompt, completion)
    references = np.stack([np.pad(g.reference, (0, 4 - g.reference.size)) for g in groups])
    mask = np.stack([np.arange(1, 4) < len(g.completions) for g in groups])
    losses, _, _ = numpy_softmax_dpo(scores[:, 0], scores[:, 1:], references[:, 0], references[:, 1:], beta, mask)
    wins = [all(scores[i, c] - references[i, c] < scores[i, 0] - references[i, 0]
                for c in range(1, len(g.completions))) for i, g in enumerate(groups)]
    assert float(sums["loss"]) == pytest.approx(losses.sum(), rel=1e-5)
    assert float(sums["chosen_nll"]) == pytest.approx(-scores[:, 0].sum(), rel=1e-5)
    assert float(objective) == pytest.approx(losses.sum() - chosen_nll * scores[:, 0].sum(), rel=1e-5)
    assert float(sums["weight"]) == 5 and float(sums["accuracy"]) == sum(wins)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_preference_stage import SETTINGS, preference_config
    from neo_jax.train.trainer import train

    root = Path({root!r})

    def kill_at_step_4(model, step):
        # SIGKILL once the step-2 checkpoint is committed: nothing after it is saved
        if step == 4:
            deadline = time.time() + 120
            while not (root / "killed" / "checkpoints" / "2").is_dir() and time.time() < deadline:
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        return {{}}

    train(preference_config(root, "killed", SETTINGS), validation_hooks=[kill_at_step_4])
""")


def final_params(run_dir: Path) -> dict:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(load_model(run_dir / "final", mesh)))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_a_stage_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    write_groups(tmp_path)
    full = train(preference_config(tmp_path, "full", SETTINGS))
    assert full.step == 6 and full.final_dir is not None
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(tests=str(Path(__file__).parent),
                                                                     root=str(tmp_path))],
                            env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2"]

    resumed = train(preference_config(tmp_path, "killed", SETTINGS))
    assert resumed.step == 6
    curve = lambda name: {r["step"]: (r["loss"], r["accuracy"], r["chosen_nll"])
                          for r in read_metrics(tmp_path / name) if "loss" in r}
    full_curve, resumed_curve = curve("full"), curve("killed")
    for step in range(3, 7):  # the steps after the restored checkpoint: same batches, same dropout masks
        np.testing.assert_allclose(resumed_curve[step], full_curve[step], rtol=1e-6)
    want, got = final_params(tmp_path / "full"), final_params(tmp_path / "killed")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=str(key))
