"""Shared test set-up: 8 emulated CPU devices, one compilation cache for the run, compiled code
released when the process holds many memory mappings, and tiny random Hugging Face models on disk."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax is imported

import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


_CACHE_VARIABLE, _MIN_TIME_VARIABLE = "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_MADE_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """One JAX compilation cache for the whole run, shared by the xdist workers and the commands the
    tests start (they inherit the variables), removed at the end; a cache the caller names is kept.

    Many tests build the same programs (each `train` call jits its step afresh, the variants of a
    bench share a model), so a program compiled once is read back after that. A read still counts
    in `neo_jax.serve.engine.compiles` (JAX times both as one backend compile).
    """
    if hasattr(config, "workerinput"):  # an xdist worker: jax read the main process's variables on import
        return
    if _CACHE_VARIABLE not in os.environ:
        config.stash[_MADE_CACHE] = os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="neo_jax_test_cache_")
    os.environ.setdefault(_MIN_TIME_VARIABLE, "0.1")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[_MIN_TIME_VARIABLE]))


def pytest_unconfigure(config):
    if _MADE_CACHE in config.stash:
        shutil.rmtree(config.stash[_MADE_CACHE], ignore_errors=True)


def _memory_mappings() -> tuple[int, int]:
    """`(mappings this process holds, the most it may hold)`; `(0, 1)` where Linux's /proc is not there."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            held = sum(1 for _ in maps)
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as limit:
            return held, int(limit.read())
    except (OSError, ValueError):
        return 0, 1


@pytest.fixture(autouse=True, scope="module")
def release_compiled_functions():
    """Drop JAX's compiled executables after a test file once the process holds half the memory
    mappings it may.

    XLA's CPU backend maps every executable's code into memory, and a process may hold at most
    `vm.max_map_count` (65,530 here) mappings. The whole suite in one process compiles enough
    functions to pass that limit, after which a compile or a cache read dies with a segmentation
    fault; clearing the caches now and then keeps the count bounded, and keeps the executables that
    files share until then.
    """
    yield
    held, limit = _memory_mappings()
    if held > limit // 2:
        jax.clear_caches()
        gc.collect()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (architecture, config overrides, save options). Hidden 64, 2 layers, vocabulary 300.
TINY_HF_MODELS = {
    "llama_llama3_rope": ("LlamaForCausalLM", {"num_key_value_heads": 2, "rope_scaling": LLAMA3_ROPE}, {}),
    "llama_tied_mqa": ("LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True,
                                            "attention_bias": True}, {}),
    "qwen2": ("Qwen2ForCausalLM", {"num_key_value_heads": 2}, {}),
    "qwen2_tied_mqa": ("Qwen2ForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}, {}),
    "qwen3_wide_heads": ("Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 32}, {}),
    # saved in bfloat16 as several safetensors shards with an index
    "qwen3_tied_sharded_bf16": ("Qwen3ForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True},
                                {"max_shard_size": "40KB", "bfloat16": True}),
}


def save_tiny_hf_model(name: str, directory: Path) -> Path:
    """Save a tiny random transformers model; every weight (biases, norms too) is random."""
    import torch
    import transformers

    architecture, overrides, save = TINY_HF_MODELS[name]
    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_theta=500.0, tie_word_embeddings=False, architectures=[architecture])
    settings.update(overrides)
    config_class = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
                    "Qwen3ForCausalLM": transformers.Qwen3Config}[architecture]
    torch.manual_seed(len(name))
    model = transformers.AutoModelForCausalLM.from_config(config_class(**settings), dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    if save.get("bfloat16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=save.get("max_shard_size", "1GB"))
    return directory


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """`tiny_hf_model(name) -> directory` of a saved model from `TINY_HF_MODELS`, made once per session."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = save_tiny_hf_model(name, tmp_path_factory.mktemp(name))
        return made[name]

    return make


def _hf_logits(model_dir: Path, tokens, positions=None, attention_mask=None):
    """float32 logits of the transformers model at `model_dir` on `tokens` `[batch, len]`."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_logits():
    """`hf_logits(model_dir, tokens, positions=None, attention_mask=None)`: the transformers reference."""
    return _hf_logits


def _random_decoder(config, mesh=None, seed: int = 0, allow_replicated=()):
    """A `Decoder` with host-drawn random parameters (norm scales near 1), placed with `load_sharded`
    (`allow_replicated`: the logical axes that may stay whole on a mesh axis that does not divide them).

    Much faster to build in tests than compiling the random initialisers.
    """
    import jax
    import numpy as np

    from neo_jax.checkpoint import abstract_decoder
    from neo_jax.config import MeshConfig
    from neo_jax.sharding import load_sharded, make_mesh

    rng = np.random.default_rng(seed)

    def draw(path, shape):
        noise = rng.normal(0.0, 0.2, shape)
        return 1.0 + noise if path[-1] == "scale" else noise

    mesh = mesh if mesh is not None else make_mesh(MeshConfig(), jax.devices()[:1])
    return load_sharded(abstract_decoder(config), draw, mesh, allow_replicated=allow_replicated)


@pytest.fixture(scope="session")
def random_decoder():
    """`random_decoder(config, mesh=None, seed=0, allow_replicated=())`: a random model on `mesh` (default: one
    device)."""
    return _random_decoder
