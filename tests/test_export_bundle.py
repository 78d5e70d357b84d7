"""`neo-jax export` and `load_bundle`: a bundle generates exactly what its checkpoint does, and a
damaged one is refused, before anything is used, with one error naming the damaged part."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from neo_jax.catalog.sid_output import SidOutput, write_sid_output
from neo_jax.catalog.table import build_trie
from neo_jax.checkpoint import save_model
from neo_jax.cli import main
from neo_jax.config import MeshConfig
from neo_jax.data.synthetic import SynthConfig, generate
from neo_jax.data.writers import write_dataset
from neo_jax.decode.commands import load_generator
from neo_jax.decode.generate import DecodeSettings
from neo_jax.errors import UserError
from neo_jax.export.bundle import FORMAT_VERSION, MANIFEST, load_bundle
from neo_jax.export.commands import export_bundle
from neo_jax.model.config import ModelConfig
from neo_jax.sharding import make_mesh
from neo_jax.tokenizer import SOURCES_FILE, MixedTokenizer, train_sentencepiece
from neo_jax.vocab import EntityType, VocabLayout, format_sid

PARAM = "params/layers/0/mlp/gate_kernel.bin"  # the parameter the damage below is done to


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_decoder):
    """A training run's `final/` of a random model, laid out as training writes it: its tokenizer
    names the SID directory (`sources.json`), which names the data directory; and its bundle."""
    root = tmp_path_factory.mktemp("export_bundle")
    dataset = generate(SynthConfig(num_items=150, num_users=20, num_queries=4, min_history=4, max_history=5))
    catalog = dataset.catalog
    (root / "data").mkdir()
    write_dataset(dataset, root / "data")
    local = np.zeros(len(catalog), np.int32)  # [items] the row among the items of its type
    for t in range(len(catalog.type_names)):
        rows = np.flatnonzero(catalog.item_types == t)
        local[rows] = np.arange(rows.size)
    codes = np.stack([local // 16, local % 16], axis=1).astype(np.int32)  # [items, 2]
    entity_types = tuple(EntityType(name, (16, 16)) for name in catalog.type_names)
    trie = build_trie(codes, catalog.item_types, (2,) * len(entity_types))
    (root / "sids").mkdir()
    write_sid_output(root / "sids", SidOutput(trie, catalog.item_ids, entity_types, {}), {"data": str(root / "data")})
    text = train_sentencepiece([catalog.item_text(r) for r in range(len(catalog))], 400, root / "text.model")
    layout = VocabLayout(text.vocab_size, entity_types, pad_multiple=32)
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=layout.padded_size, num_real_tokens=layout.size,
                         hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, max_position_embeddings=256, eos_token_id=text.eos_id)
    final = root / "final"
    save_model(final, random_decoder(config, seed=4), layout)
    MixedTokenizer(text, layout).save(final / "tokenizer")
    (final / "tokenizer" / SOURCES_FILE).write_text(json.dumps({"sids": str(root / "sids")}))
    mesh = make_mesh(MeshConfig())
    export_bundle(final, root / "bundle", mesh)
    return root, catalog, mesh


def prompts(catalog) -> tuple[list[str], list[list[str]], list[str]]:
    """`(ids prompts, their excluded items, text and mixed prompts)`, over every entity type."""
    ids_prompts, excluded = [], []
    for name in catalog.type_names:
        history = catalog.rows_of_type(name)[:2]
        sids = " ".join(format_sid(name, (int(r) // 16, int(r) % 16)) for r in range(2))
        ids_prompts.append(f"task: recommend | type: {name} | format: ids\nHistory: {sids}\n"
                           f"Which {name} will this user choose next?")
        excluded.append([catalog.item_ids[r] for r in history])
    product = catalog.type_names[0]
    ids_prompts.append(f"task: search | type: {product} | format: ids\nFind a {product} for the query: red lipstick")
    excluded.append([])
    free = [f"task: explain | type: {product} | format: mixed\nHistory: {format_sid(product, (0, 1))}\n"
            f"Suggest the next {product} with a reason.",
            f"task: sid_to_text | type: {product} | format: text\nDescribe the item {format_sid(product, (0, 2))}."]
    return ids_prompts, excluded, free


def generations(generator, catalog) -> list:
    ids_prompts, excluded, free = prompts(catalog)
    ids = generator.generate(ids_prompts, DecodeSettings("beam", max_new_tokens=5, beam_size=4), excluded_ids=excluded)
    text = generator.generate(free, DecodeSettings("beam", max_new_tokens=12, beam_size=3))
    return [[beam.to_dict() for beam in beams] for beams in ids + text]


def test_bundle_generates_exactly_what_its_checkpoint_does(run):
    root, catalog, mesh = run
    from_checkpoint = load_generator(root / "final", None, mesh, default_titles=True)
    from_bundle = load_bundle(root / "bundle", mesh)
    expected = generations(from_checkpoint, catalog)
    assert generations(from_bundle, catalog) == expected
    named = [item for beams in expected for beam in beams for item in beam["items"] if item is not None]
    assert named and all(item["title"] == catalog.title(catalog.row_of[item["id"]]) for item in named)
    ids_prompts, excluded, _ = prompts(catalog)
    settings = DecodeSettings("beam", max_new_tokens=5, beam_size=6)
    assert (from_bundle.rank_items(ids_prompts, settings, excluded_ids=excluded).tolist()
            == from_checkpoint.rank_items(ids_prompts, settings, excluded_ids=excluded).tolist())


def test_manifest_lists_every_file_with_its_checksum_and_every_parameter_with_its_shape(run):
    root, catalog, _ = run
    bundle = root / "bundle"
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["params_dtype"] == "float32"
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["files"][PARAM]["shape"] == [32, 48] and manifest["files"][PARAM]["dtype"] == "float32"
    assert {"model_config.json", "tokenizer/vocab_layout.json", "sids/sids.tsv", "sids/trie/trie.json",
            "catalog.jsonl"} <= on_disk
    lines = [json.loads(line) for line in (bundle / "catalog.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == catalog.item_ids
    assert lines[0]["title"] == catalog.title(0) and lines[0]["type"] == catalog.type_name(0) and lines[0]["fields"]
    assert manifest["source"]["data"] == str(root / "data")


def test_bfloat16_bundle_stores_half_the_bytes_and_loads_the_rounded_parameters(run, tmp_path):
    root, catalog, mesh = run
    manifest = export_bundle(root / "final", tmp_path / "bf16", mesh, dtype="bfloat16")
    assert manifest["params_dtype"] == "bfloat16" and manifest["files"][PARAM]["dtype"] == "bfloat16"
    assert manifest["files"][PARAM]["bytes"] == 32 * 48 * 2
    generator = load_bundle(tmp_path / "bf16", mesh)
    original = load_generator(root / "final", None, mesh).model
    for (path, loaded), (_, stored) in zip(nnx.to_flat_state(nnx.state(generator.model, nnx.Param)),
                                           nnx.to_flat_state(nnx.state(original, nnx.Param))):
        rounded = np.asarray(stored.get_value()).astype(jax.numpy.bfloat16).astype(np.float32)
        assert np.asarray(loaded.get_value()).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(loaded.get_value()), rounded, err_msg=str(path))
    ids_prompts, excluded, _ = prompts(catalog)
    ranked = generator.rank_items(ids_prompts, DecodeSettings("beam", max_new_tokens=5, beam_size=4),
                                  excluded_ids=excluded)
    assert (ranked >= 0).all()


def _rehash(bundle: Path, name: str) -> None:
    """Record `name`'s present checksum and size in the manifest (a consistent, but wrong, bundle)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    data = (bundle / name).read_bytes()
    manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _edit_json(path: Path, edit) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _mismatched_layout(bundle: Path) -> None:
    """The tokenizer's layout with the last level of the first type one code larger than the trie's."""
    def grow(layout):
        sizes = layout["entity_types"][0]["codebook_sizes"]
        sizes[-1] += 1
    _edit_json(bundle / "tokenizer/vocab_layout.json", grow)
    _rehash(bundle, "tokenizer/vocab_layout.json")


def _other_model(bundle: Path) -> None:
    _edit_json(bundle / "model_config.json", lambda config: config.update(intermediate_size=96))
    _rehash(bundle, "model_config.json")


def _other_dtype(bundle: Path) -> None:
    _edit_json(bundle / MANIFEST, lambda manifest: manifest["files"][PARAM].update(dtype="int32"))


@pytest.mark.parametrize("damage, message", [
    (lambda b: _flip_byte(b / PARAM), f"{PARAM}: its sha256 is not the one manifest.json lists"),
    (lambda b: (b / PARAM).write_bytes((b / PARAM).read_bytes()[:100]),
     f"{PARAM}: 100 bytes, manifest.json lists 6144 (truncated or changed)"),
    (lambda b: (b / PARAM).unlink(), f"{PARAM}: missing from the bundle"),
    (lambda b: (b / "sids/sids.tsv").unlink(), "sids/sids.tsv: missing from the bundle"),
    (lambda b: _edit_json(b / MANIFEST, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
     f"manifest.json: bundle format version {FORMAT_VERSION + 1}; this neo_jax reads version {FORMAT_VERSION}"),
    (lambda b: (b / MANIFEST).unlink(), "manifest.json: not found"),
    (_mismatched_layout, ("tokenizer/vocab_layout.json: the tokenizer's SID blocks do not match the SID catalog",
                          "type 'product' has codebook sizes [16, 17] there, [16, 16] in the trie")),
    (_other_model, "params/layers/0/mlp/down_kernel.bin: shape [48, 32] in manifest.json, but the model in "
                   "model_config.json has [96, 32]"),
    (_other_dtype, f"{PARAM}: dtype 'int32' in manifest.json, not the bundle's parameter dtype 'float32'"),
    (lambda b: (b / "extra.txt").write_text("x"), "extra.txt: not listed in manifest.json"),
], ids=["flipped-byte", "truncated", "deleted-param", "deleted-sids", "unknown-version", "no-manifest",
        "tokenizer-layout", "shape", "dtype", "unlisted-file"])
def test_a_damaged_bundle_is_refused_naming_the_part(run, tmp_path, damage, message):
    root, _, mesh = run
    bundle = shutil.copytree(root / "bundle", tmp_path / "bundle")
    damage(bundle)
    with pytest.raises(UserError) as error:
        load_bundle(bundle, mesh)
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_command_serves_a_bundle_as_it_serves_the_checkpoint(run, tmp_path, capsys):
    root, catalog, _ = run
    code, out, err = _cli(capsys, "export", str(root / "final"), str(tmp_path / "bundle"))
    assert code == 0, err
    assert json.loads(out)["params_dtype"] == "float32"
    prompt = prompts(catalog)[0][0]
    code, from_checkpoint, err = _cli(capsys, "generate", "--ckpt", str(root / "final"), "--prompt", prompt)
    assert code == 0, err
    code, from_bundle, err = _cli(capsys, "generate", "--bundle", str(tmp_path / "bundle"), "--prompt", prompt)
    assert code == 0, err
    assert from_bundle == from_checkpoint and json.loads(from_bundle)["beams"][0]["items"][0]["title"]


def _one_error_line(command: str, code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"neo-jax {command}: error: "), err
    return lines[0]


def test_export_refuses_an_existing_output_and_leaves_nothing_on_error(run, tmp_path, capsys):
    root, _, _ = run
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = _cli(capsys, "export", str(root / "final"), str(out))
    assert "--overwrite" in _one_error_line("export", code, err) and (out / "keep").read_text() == "x"
    other_sids = shutil.copytree(root / "sids", tmp_path / "other_sids")
    _edit_json(other_sids / "summary.json", lambda s: s["entity_types"][0].update(codebook_sizes=[16, 8]))
    code, _, err = _cli(capsys, "export", str(root / "final"), str(tmp_path / "new"), "--sids", str(other_sids))
    assert "SID blocks do not match" in _one_error_line("export", code, err)
    code, _, err = _cli(capsys, "export", str(tmp_path / "nowhere"), str(tmp_path / "new"))
    assert "nowhere" in _one_error_line("export", code, err)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
    code, _, err = _cli(capsys, "export", str(root / "final"), str(out), "--overwrite", "--dtype", "bfloat16")
    assert code == 0, err
    assert not (out / "keep").exists() and json.loads((out / MANIFEST).read_text())["params_dtype"] == "bfloat16"


def test_generate_command_refuses_a_damaged_bundle_in_one_line(run, tmp_path, capsys):
    root, _, _ = run
    bundle = shutil.copytree(root / "bundle", tmp_path / "bundle")
    _flip_byte(bundle / PARAM)
    code, _, err = _cli(capsys, "generate", "--bundle", str(bundle), "--prompt", "hi")
    assert PARAM in _one_error_line("generate", code, err)
    code, _, err = _cli(capsys, "generate", "--bundle", str(root / "bundle"), "--sids", str(root / "sids"),
                        "--prompt", "hi")
    assert "a bundle carries its own" in _one_error_line("generate", code, err)
