"""Stages on the generated default catalog: what learns, what stays bit-for-bit, and that it learns."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from neo_jax.checkpoint import load_model, save_model
from neo_jax.config import MeshConfig
from neo_jax.model import Decoder, ModelConfig
from neo_jax.sharding import make_mesh
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.train import stages
from neo_jax.train.config import LoraConfig
from neo_jax.train.monitor import read_metrics
from neo_jax.train.trainer import train
from train_fixtures import LAYOUT, tiny_config, write_catalog_dataset

ONE_DEVICE = jax.devices()[:1]
CATALOG_RUN = ("seq_len=128", "steps=24", "batch_size=8", "eval.every_steps=24", "eval.batches=2",
               "checkpoint.every_steps=100", "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=2", "log_every=8")


def flat_params(checkpoint_dir):
    model = load_model(checkpoint_dir, make_mesh(MeshConfig(), ONE_DEVICE))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """The catalog's records and tokenizer, and a random model checkpoint with its vocabulary."""
    root = tmp_path_factory.mktemp("catalog")
    records, tokenizer_dir = write_catalog_dataset(root)
    layout = MixedTokenizer.load(tokenizer_dir).layout
    config = ModelConfig("LlamaForCausalLM", vocab_size=layout.padded_size, num_real_tokens=layout.size,
                         hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12)
    save_model(root / "init", Decoder(config, nnx.Rngs(1)), layout)
    return root, layout


def catalog_config(root, name, *overrides):
    return tiny_config(root, name, CATALOG_RUN + (f"init.checkpoint={root / 'init'}", "init.model_config=null")
                       + overrides)


def valid_losses(run_dir):
    return [r["valid_loss"] for r in read_metrics(run_dir) if "valid_loss" in r]


def test_grounding_moves_only_sid_rows_and_lowers_validation_loss(catalog):
    root, layout = catalog
    result = train(catalog_config(root, "grounding", "stage=grounding", "optimizer.learning_rate=3e-2"),
                   devices=ONE_DEVICE)
    before, after = flat_params(root / "init"), flat_params(result.final_dir)
    learned = stages.learned_token_rows(layout)[:, 0]  # [vocab]
    for path, value in before.items():
        if path[0] in stages.TOKEN_TABLES:
            np.testing.assert_array_equal(after[path][~learned].view(np.uint32), value[~learned].view(np.uint32),
                                          err_msg=f"{path}: a text or padding row moved")
            assert (after[path][learned] != value[learned]).any(axis=1).mean() > 0.5, path
        else:
            np.testing.assert_array_equal(after[path].view(np.uint32), value.view(np.uint32), err_msg=str(path))
    start, end = valid_losses(root / "grounding")
    assert end < start - 0.1, (start, end)


def test_instruct_trains_every_weight_and_lowers_validation_loss(catalog):
    root, layout = catalog
    result = train(catalog_config(root, "instruct", "stage=instruct"), devices=ONE_DEVICE)
    before, after = flat_params(root / "init"), flat_params(result.final_dir)
    assert all((after[path] != value).any() for path, value in before.items())
    start, end = valid_losses(root / "instruct")
    assert end < start - 0.5, (start, end)
    from neo_jax.decode.commands import load_tokenizer  # the final model carries its tokenizer
    assert load_tokenizer(result.final_dir).layout == layout


def test_lora_trains_adapters_and_sid_rows_only(catalog):
    root, layout = catalog
    result = train(catalog_config(root, "lora", "stage=instruct", "lora.rank=4", "lora.targets=[q_kernel,up_kernel]"),
                   devices=ONE_DEVICE)
    before, after = flat_params(root / "init"), flat_params(result.final_dir)
    learned = stages.learned_token_rows(layout)[:, 0]
    for path, value in before.items():
        if path[-1] in ("q_kernel", "up_kernel"):
            assert (after[path] != value).any(), f"{path}: the merged adapter did not change the kernel"
        elif path[0] in stages.TOKEN_TABLES:
            np.testing.assert_array_equal(after[path][~learned], value[~learned])
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    start, end = valid_losses(root / "lora")
    assert end < start, (start, end)


def test_lora_adapters_start_as_the_identity():
    plan = stages.make_plan("instruct", LoraConfig(rank=2, targets=("o_kernel",)), LAYOUT)
    params = {"layers": {0: {"attn": {"o_kernel": np.ones((4, 8, 32), np.float32)}}},
              "embed_tokens": np.ones((LAYOUT.padded_size, 32), np.float32)}
    trainable, frozen = plan.split(params, jax.random.key(0))
    adapter = trainable["lora"]["layers"][0]["attn"]["o_kernel"]
    assert adapter["a"].shape == (32, 2) and adapter["b"].shape == (2, 32)  # o: [heads*head_dim, rank], [rank, embed]
    merged = plan.params(trainable, frozen)
    np.testing.assert_array_equal(merged["layers"][0]["attn"]["o_kernel"], params["layers"][0]["attn"]["o_kernel"])


def test_masked_optimizer_gives_exact_zero_updates_to_frozen_rows_despite_weight_decay():
    plan = stages.make_plan("grounding", LoraConfig(), LAYOUT)
    trainable = {"model": {"embed_tokens": jax.random.normal(jax.random.key(0), (LAYOUT.padded_size, 8))},
                 "lora": {}}
    masks = plan.update_masks(trainable)
    tx = stages.make_optimizer(stages.OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5), 10, masks)
    grads = jax.tree.map(lambda x: np.ones(x.shape, np.float32), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    new = stages.apply_masked_updates(trainable, updates, masks)
    rows = stages.learned_token_rows(LAYOUT)[:, 0]
    table, old = np.asarray(new["model"]["embed_tokens"]), np.asarray(trainable["model"]["embed_tokens"])
    assert np.all(np.asarray(updates["model"]["embed_tokens"])[~rows] == 0.0)
    np.testing.assert_array_equal(table[~rows], old[~rows])
    assert np.all(table[rows] != old[rows])
    assert optax.tree.norm(updates) > 0


def test_an_imported_checkpoint_gains_the_sid_rows_when_grounding_starts(catalog):
    """As after `neo-jax import-hf`: a text-only vocabulary, extended to the tokenizer's layout."""
    root, layout = catalog
    text_only = ModelConfig("LlamaForCausalLM", vocab_size=layout.text_size, hidden_size=48, intermediate_size=96,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12)
    save_model(root / "imported", Decoder(text_only, nnx.Rngs(2)))
    result = train(catalog_config(root, "from_import", "stage=grounding", f"init.checkpoint={root / 'imported'}",
                                  "steps=4", "eval.every_steps=0"), devices=ONE_DEVICE)
    before, after = flat_params(root / "imported"), flat_params(result.final_dir)
    assert after[("embed_tokens",)].shape == (layout.padded_size, 48)
    for table in (("embed_tokens",), ("lm_head",)):
        np.testing.assert_array_equal(after[table][: layout.text_size], before[table])
    np.testing.assert_array_equal(after[("layers", 0, "mlp", "up_kernel")], before[("layers", 0, "mlp", "up_kernel")])
