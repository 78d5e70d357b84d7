"""Generation with the real `Decoder`: scores equal a full forward pass, SIDs resolve, bad prompts fail clearly."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from neo_jax.catalog.table import build_trie
from neo_jax.decode.constraint import SidConstraint, Unconstrained, sid_requests
from neo_jax.decode.generate import (DecodeSettings, ItemRef, decode, lower_decode, pack_prompts, resolve,
                                    split_sids)
from neo_jax.decode.sid_tables import SidTables
from neo_jax.errors import UserError
from neo_jax.config import MeshConfig
from neo_jax.model.config import ModelConfig
from neo_jax.sharding import make_mesh
from neo_jax.vocab import EntityType, VocabLayout
from sid_fixtures import EOS_ID, LAYOUT, Request, ReferenceRules, Catalog

CONFIG = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=LAYOUT.padded_size, num_real_tokens=LAYOUT.size,
                     hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     max_position_embeddings=32)
PROMPTS = [(2, 3, 4, 5, 2), (3,), (4, 2, 5)]
REQUESTS = [Request(None, "mixed", ()), Request(("type1", "type2"), "ids", (0, 3)), Request(None, "text", ())]


def full_catalog() -> Catalog:
    """Every SID of the fixture layout, but a single item of type0."""
    rows = [(0, (1,))] + [(t, sid) for t in (1, 2) for sid in itertools.product(
        *[range(s) for s in LAYOUT.entity_types[t].codebook_sizes])]
    codes = np.full((len(rows), 3), -1, np.int32)
    for i, (_, sid) in enumerate(rows):
        codes[i, : len(sid)] = sid
    trie = build_trie(codes, np.array([t for t, _ in rows]), (1, 2, 3))
    item_tokens = tuple(tuple(LAYOUT.sid_token(t, level, c) for level, c in enumerate(sid)) for t, sid in rows)
    return Catalog(LAYOUT, trie, item_tokens)


forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions)[0])


def full_pass_log_prob(model, prompt: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    sequence = np.array([prompt + continuation], np.int32)  # [1, len]
    logits = forward(model, sequence, np.arange(sequence.shape[1], dtype=np.int32)[None])  # [1, len, vocab]
    log_probs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))  # [len, vocab]
    return float(sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(continuation)))


@pytest.fixture(scope="module")
def setup(random_decoder):
    catalog = full_catalog()
    tables = SidTables.from_trie(catalog.trie, LAYOUT)
    requests_on_device = sid_requests(
        catalog.trie, LAYOUT, tables, entity_types=[r.entity_types for r in REQUESTS],
        output_formats=[r.output_format for r in REQUESTS], beam_size=3,
        excluded_rows=[r.excluded_rows for r in REQUESTS])
    constraint = SidConstraint.create(tables, requests_on_device, LAYOUT, EOS_ID)
    packed = pack_prompts(PROMPTS, max_context=CONFIG.max_position_embeddings, max_new_tokens=10,
                          vocab_limit=LAYOUT.size)
    return random_decoder(CONFIG, seed=3), catalog, constraint, packed


@pytest.mark.parametrize("settings", [DecodeSettings("beam", max_new_tokens=10, beam_size=3, alpha=0.6),
                                      DecodeSettings("sample", max_new_tokens=10, beam_size=3, top_k=8)])
def test_decoded_beams_score_their_full_pass_log_probability_and_obey_the_constraint(setup, settings):
    model, catalog, constraint, packed = setup
    result = decode(model, packed, constraint, settings, EOS_ID)
    beams = resolve(result, LAYOUT, catalog.trie)
    for b, (prompt, request) in enumerate(zip(PROMPTS, REQUESTS)):
        rules = ReferenceRules(catalog, request, None)
        assert beams[b], f"request {b} decoded nothing"
        for beam in beams[b]:
            assert beam.log_prob == pytest.approx(full_pass_log_prob(model, prompt, beam.tokens), abs=1e-4)
            rules.check(beam.tokens)
            for item in beam.items:
                assert item.row is not None and catalog.item_tokens[item.row] in rules.items
    if settings.method == "beam":
        scores = np.asarray(result.scores)
        assert np.all(np.diff(scores, axis=1) <= 0)  # best first
        assert all(beam.finished and len(beam.items) == 1 for beam in beams[1]) and len(beams[1]) == 3
        assert len({beam.items[0].row for beam in beams[1]}) == 3  # ID mode: K distinct items


@pytest.mark.parametrize("method", ["beam", "sample"])
def test_codes_only_id_mode_decodes_just_the_codes_and_ranks_items_by_their_probability(setup, method):
    """With `ids_codes_only` the prompt ends with `[SID]` and a sequence ends at its leaf: a beam as
    wide as the allowed items returns every one of them, ranked by the codes' log-probability."""
    model, catalog, constraint, _ = setup
    request = REQUESTS[1]  # ID mode, types 1 and 2, rows 0 and 3 excluded: 17 items
    items = ReferenceRules(catalog, request, None).items
    prompt = (4, 2, 5, LAYOUT.sid_open_id)
    requests_on_device = sid_requests(catalog.trie, LAYOUT, constraint.tables, entity_types=[request.entity_types],
                                      output_formats=["ids"], beam_size=len(items),
                                      excluded_rows=[request.excluded_rows])
    codes_only = SidConstraint.create(constraint.tables, requests_on_device, LAYOUT, EOS_ID, ids_codes_only=True)
    packed = pack_prompts([prompt], max_context=32, max_new_tokens=3, vocab_limit=LAYOUT.size)
    settings = DecodeSettings(method, max_new_tokens=3, beam_size=len(items), top_k=0)
    result = decode(model, packed, codes_only, settings, EOS_ID)
    beams = resolve(result, LAYOUT, catalog.trie, [True], EOS_ID)[0]
    assert int(result.steps) == 3  # the deepest item's three codes, no forced token
    assert all(beam.finished and beam.tokens[0] == LAYOUT.sid_open_id
               and beam.tokens[-2:] == (LAYOUT.sid_close_id, EOS_ID) for beam in beams)
    for beam in beams:
        assert catalog.item_tokens[beam.items[0].row] in items
        assert beam.log_prob == pytest.approx(full_pass_log_prob(model, prompt, beam.tokens[1:-2]), abs=1e-4)
    if method == "beam":
        expected = sorted(((full_pass_log_prob(model, prompt, tokens), tokens) for tokens in items), reverse=True)
        assert [beam.tokens[1:-2] for beam in beams] == [tokens for _, tokens in expected]


def test_unconstrained_decoding_never_emits_padding_rows(setup):
    model, _, _, packed = setup
    result = decode(model, packed, Unconstrained(LAYOUT.size), DecodeSettings("beam", max_new_tokens=10,
                                                                              beam_size=3), EOS_ID)
    assert int(np.asarray(result.tokens).max()) < LAYOUT.size


def test_beam_search_sharded_on_8_devices_equals_one_device(setup, random_decoder):
    _, catalog, constraint, _ = setup
    prompts = PROMPTS + [(5, 4)]  # a batch of 4 splits over data x fsdp = 4
    packed = pack_prompts(prompts, max_context=32, max_new_tokens=10, vocab_limit=LAYOUT.size)
    settings = DecodeSettings("beam", max_new_tokens=10, beam_size=3, alpha=0.6)
    results = []
    for mesh in (make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), make_mesh(MeshConfig(), jax.devices()[:1])):
        tables = SidTables.from_trie(catalog.trie, LAYOUT, mesh)  # replicated on the mesh once
        assert all(leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)
                   for leaf in jax.tree.leaves(tables))
        requests_on_device = sid_requests(catalog.trie, LAYOUT, tables, entity_types=[None] * 4,
                                          output_formats=["mixed", "ids", "text", "ids"], beam_size=3)
        constraint = SidConstraint.create(tables, requests_on_device, LAYOUT, EOS_ID)
        model = random_decoder(CONFIG, mesh, seed=5, allow_replicated=("kv_heads",))  # one KV head, tensor=2
        results.append(decode(model, packed, constraint, settings, EOS_ID, mesh))
    sharded, single = results
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.lengths, single.lengths)
    np.testing.assert_allclose(sharded.scores, single.scores, atol=1e-4)


@pytest.mark.parametrize("batch", [4, 8])  # replicated prompts; prompts split over the 8 devices
def test_the_tables_stay_whole_on_every_device_of_a_mesh(random_decoder, batch):
    """Each device reads its own copy of the bitmaps: the compiled decode never slices them (XLA's
    propagation from the vocabulary-sharded logits used to split their words over fsdp, re-slicing
    the tables at each call and exchanging pieces at each step)."""
    layout = VocabLayout(text_size=64, entity_types=(EntityType("item", (256, 256)),))  # 8 bitmap words
    codes = np.random.default_rng(0).permutation(256 * 256)[:600]  # [items], distinct
    trie = build_trie(np.stack([codes // 256, codes % 256], 1), np.zeros(600, np.int32), (2,))
    mesh = make_mesh(MeshConfig())  # fsdp=8
    tables = SidTables.from_trie(trie, layout, mesh)
    requests_on_device = sid_requests(trie, layout, tables, entity_types=[None] * batch,
                                      output_formats=["ids", "mixed"] * (batch // 2), beam_size=3)
    constraint = SidConstraint.create(tables, requests_on_device, layout, EOS_ID)
    config = dataclasses.replace(CONFIG, vocab_size=layout.padded_size, num_real_tokens=layout.size)
    model = random_decoder(config, mesh, seed=5, allow_replicated=("kv_heads",))
    packed = pack_prompts((PROMPTS * 3)[:batch], max_context=32, max_new_tokens=6, vocab_limit=layout.size)
    settings = DecodeSettings("beam", max_new_tokens=6, beam_size=3)
    hlo = lower_decode(model, packed, constraint, settings, EOS_ID, mesh).compile().as_text()
    (size,) = tables.child_bits.shape
    assert {int(n) for n in re.findall(r"u32\[(\d+)\]", hlo) if int(n) >= size // 8} == {size}


def test_split_sids_resolves_spans_and_keeps_an_unclosed_one_as_ids():
    catalog = full_catalog()
    item = catalog.item_tokens[5]
    tokens = (2, LAYOUT.sid_open_id, *item, LAYOUT.sid_close_id, 3, LAYOUT.sid_open_id, item[0])
    pieces = split_sids(tokens, LAYOUT, catalog.trie)
    assert pieces[0] == (2,) and isinstance(pieces[1], ItemRef) and pieces[1].row == 5
    assert pieces[2] == (3, LAYOUT.sid_open_id, item[0])
    bogus = split_sids((LAYOUT.sid_open_id, item[1], item[0], LAYOUT.sid_close_id), LAYOUT, catalog.trie)
    assert bogus[0].row is None  # levels out of order: not an item


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts to decode"),
    ([(2, 3), ()], "prompt 1 is empty"),
    ([(2,) * 25], "prompt 0 has 25 tokens; with max_new_tokens=10 it exceeds the model's context of 32"),
    ([(2, 99)], "prompt 0 has token id 99 outside the vocabulary"),
])
def test_bad_prompts_get_a_clear_error(prompts, message):
    with pytest.raises(UserError, match=message):
        pack_prompts(prompts, max_context=32, max_new_tokens=10, vocab_limit=LAYOUT.size)


def test_pack_prompts_left_pads_with_positions_from_each_prompt_start():
    packed = pack_prompts([(7, 8, 9), (5,)], max_context=8, max_new_tokens=2, vocab_limit=10)
    assert packed.tokens.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert packed.segment_ids.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert packed.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert packed.lengths.tolist() == [3, 1]


def test_pack_prompts_rounds_the_width_up_within_the_context():
    packed = pack_prompts([(7, 8, 9), (5,)], max_context=8, max_new_tokens=2, vocab_limit=10, width_multiple=4)
    assert packed.tokens.tolist() == [[0, 7, 8, 9], [0, 0, 0, 5]]
    assert packed.positions.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    capped = pack_prompts([(7, 8, 9)], max_context=5, max_new_tokens=2, vocab_limit=10, width_multiple=4)
    assert capped.tokens.tolist() == [[7, 8, 9]]  # 3 prompt + 2 new tokens fill the context


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, random_decoder):
    """A checkpoint of a random model, its tokenizer, a `sids build` directory and a data directory."""
    from neo_jax.catalog.sid_output import SidOutput, write_sid_output
    from neo_jax.checkpoint import save_model
    from neo_jax.data.synthetic import SynthConfig, generate
    from neo_jax.data.writers import write_dataset
    from neo_jax.tokenizer import MixedTokenizer, train_sentencepiece
    from neo_jax.vocab import EntityType, VocabLayout

    root = tmp_path_factory.mktemp("generate_cli")
    dataset = generate(SynthConfig(num_items=150, num_users=20, num_queries=4, min_history=4, max_history=5))
    catalog = dataset.catalog
    (root / "data").mkdir()
    write_dataset(dataset, root / "data")
    local = np.zeros(len(catalog), np.int32)
    for t in range(len(catalog.type_names)):
        rows = np.flatnonzero(catalog.item_types == t)
        local[rows] = np.arange(rows.size)
    codes = np.stack([local // 16, local % 16], axis=1).astype(np.int32)  # [items, 2]
    trie = build_trie(codes, catalog.item_types, (2,) * len(catalog.type_names))
    entity_types = tuple(EntityType(name, (16, 16)) for name in catalog.type_names)
    (root / "sids").mkdir()
    write_sid_output(root / "sids", SidOutput(trie, catalog.item_ids, entity_types, {}), {})
    text = train_sentencepiece([catalog.item_text(r) for r in range(len(catalog))], 400, root / "text.model")
    layout = VocabLayout(text.vocab_size, entity_types, pad_multiple=32)
    MixedTokenizer(text, layout).save(root / "tokenizer")
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=layout.padded_size, num_real_tokens=layout.size,
                         hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, max_position_embeddings=256, eos_token_id=text.eos_id)
    save_model(root / "ckpt", random_decoder(config, seed=2), layout)
    return root, catalog


def run_cli(capsys, *argv: str) -> tuple[int, list[dict], str]:
    from neo_jax.cli import main

    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.strip()], captured.err


def test_generate_command_names_catalog_items_with_titles(cli_inputs, capsys):
    root, catalog = cli_inputs
    product = catalog.type_names[0]
    history = [catalog.item_ids[r] for r in catalog.rows_of_type(product)[:3]]
    code, lines, err = run_cli(
        capsys, "--ckpt", str(root / "ckpt"), "--sids", str(root / "sids"), "--data", str(root / "data"),
        "--tokenizer", str(root / "tokenizer"), "--beams", "3", "--max-new-tokens", "6",
        *sum([["--exclude", i] for i in history], []),
        "--prompt", f"task: recommend | type: {product} | format: ids\nWhat next?", "--prompt", "Tell me more.")
    assert code == 0, err
    ids_beams, mixed_beams = lines[0]["beams"], lines[1]["beams"]
    assert len(ids_beams) == 3 and all(len(b["items"]) == 1 and b["finished"] for b in ids_beams)
    names = {b["items"][0]["id"] for b in ids_beams}
    assert len(names) == 3 and not names & set(history)
    for beam in ids_beams + mixed_beams:
        for item in beam["items"]:
            row = catalog.row_of[item["id"]]
            assert item["title"] == catalog.title(row) and item["type"] == catalog.type_name(row)
    assert all(b["items"][0]["type"] == product for b in ids_beams)


def test_a_prompts_file_in_small_batches_gives_each_prompt_the_items_of_one_batch(cli_inputs, capsys, tmp_path):
    root, catalog = cli_inputs
    requests = tmp_path / "requests.jsonl"
    types = catalog.type_names
    requests.write_text("".join(json.dumps({"prompt": f"task: recommend | type: {types[i % len(types)]} | format: ids"
                                                      f"\nUser {i} liked these.",
                                            "exclude": [catalog.item_ids[i]]}) + "\n" for i in range(5)))
    common = ["--ckpt", str(root / "ckpt"), "--sids", str(root / "sids"), "--tokenizer", str(root / "tokenizer"),
              "--beams", "3", "--prompts", str(requests)]
    _, whole, _ = run_cli(capsys, *common, "--batch", "8")
    code, batched, err = run_cli(capsys, *common, "--batch", "2")  # batches of 2, 2 and 1 (padded to 2)
    assert code == 0, err
    item_ids = lambda lines: [[b["items"][0]["id"] for b in line["beams"]] for line in lines]
    assert [line["prompt"] for line in batched] == [line["prompt"] for line in whole]
    assert item_ids(batched) == item_ids(whole) and len(batched) == 5
    for i, names in enumerate(item_ids(batched)):
        assert catalog.item_ids[i] not in names  # each prompt keeps its own exclusions


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0", "--prompt", "hi"], "--batch must be at least 1"),
    (["--prompt", "task: recommend | type: planet | format: ids\nx"], "request 0: unknown entity type 'planet'"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "word " * 200], "exceeds the model's context of 256 tokens"),
    (["--prompt", "hi", "--format", "ids", "--type", "{first_type}", "--beams", "1000"],
     "beam size 1000 is larger than the"),
    (["--prompt", "hi", "--exclude", "no-such-item"], "excluded item id 'no-such-item' is not in the SID catalog"),
])
def test_generate_command_rejects_bad_requests(cli_inputs, capsys, argv, message):
    root, catalog = cli_inputs
    argv = [a.replace("{first_type}", catalog.type_names[0]) for a in argv]
    code, _, err = run_cli(capsys, "--ckpt", str(root / "ckpt"), "--sids", str(root / "sids"),
                           "--tokenizer", str(root / "tokenizer"), *argv)
    assert code == 2 and message in err, err


def test_an_in_stock_subset_is_built_on_the_device_once_and_reused(cli_inputs):
    """Batches that name the same in-stock items reuse the subset's device arrays (the per-node scatter
    runs once per subset), answer as a generator that builds it afresh does, and name only in-stock items."""
    from neo_jax.decode.commands import load_generator

    root, catalog = cli_inputs
    mesh = make_mesh(MeshConfig())
    generator = load_generator(root / "ckpt", root / "sids", mesh, root / "tokenizer")
    product = catalog.type_names[0]
    products = [catalog.item_ids[r] for r in catalog.rows_of_type(product)]
    in_stock, other = set(products[::2]), set(products[1::3])
    prompts = [f"task: recommend | type: {product} | format: ids\nuser {u}" for u in range(2)]
    settings = DecodeSettings(method="beam", max_new_tokens=5, beam_size=4)
    names = lambda answers: [[b.items[0].item_id for b in beams] for beams in answers]  # noqa: E731
    first = names(generator.generate(prompts, settings, allowed_ids=in_stock))
    again = names(generator.generate(prompts[::-1], settings, allowed_ids=set(in_stock)))  # same content
    assert generator.subsets.built == 1 and again == first[::-1]
    assert all(item in in_stock for beams in first for item in beams)
    names(generator.generate(prompts, settings, allowed_ids=other))
    assert generator.subsets.built == 2
    fresh = load_generator(root / "ckpt", root / "sids", mesh, root / "tokenizer")
    assert names(fresh.generate(prompts, settings, allowed_ids=in_stock)) == first


def test_rank_items_gives_the_items_generate_names_in_the_same_order(cli_inputs):
    from neo_jax.decode.commands import load_generator

    root, catalog = cli_inputs
    generator = load_generator(root / "ckpt", root / "sids", make_mesh(MeshConfig()), root / "tokenizer")
    product = catalog.type_names[0]
    products = [catalog.item_ids[r] for r in catalog.rows_of_type(product)]
    prompts = [f"task: recommend | type: {product} | format: ids\nuser {u}" for u in range(3)]
    settings = DecodeSettings(method="beam", max_new_tokens=5, beam_size=6)
    for excluded in (None, [products[:2], [], products[2:40]]):
        rows = generator.rank_items(prompts, settings, excluded_ids=excluded)  # [prompts, beams]
        named = [[generator.row_of_id[c.items[0].item_id] for c in beams]
                 for beams in generator.generate(prompts, settings, excluded_ids=excluded)]
        assert rows.tolist() == named
        assert all(catalog.type_name(r) == product for r in rows.ravel())
        if excluded is not None:
            assert not {catalog.item_ids[r] for r in rows[2]} & set(excluded[2])
    with pytest.raises(UserError, match="prompt 1: ranking items needs a task header asking for the 'ids' format, "
                                        "it has no header"):
        generator.rank_items([prompts[0], "what next?"], settings)


def test_every_task_header_round_trips_through_the_generate_command(cli_inputs, capsys):
    from neo_jax.tasks.builders import ANY_TYPE, TASK_FORMATS, TASKS, render_prompt
    from neo_jax.vocab import format_sid

    root, catalog = cli_inputs
    product = catalog.type_names[0]
    sid = format_sid(product, (0, 1))
    fields = {"history": sid, "history_titled": sid, "query": "red", "sid": sid, "text": "red", "user": sid}
    cases = [(task, ANY_TYPE if task == "user_profile" else product, output_format)
             for task in TASKS for output_format in TASK_FORMATS[task]]
    argv = ["--ckpt", str(root / "ckpt"), "--sids", str(root / "sids"), "--tokenizer", str(root / "tokenizer"),
            "--data", str(root / "data"), "--beams", "2", "--max-new-tokens", "8"]
    for task, entity_type, output_format in cases:
        argv += ["--prompt", render_prompt(task, entity_type, output_format, 0, **fields)]
    code, lines, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert len(lines) == len(cases)
    for (task, entity_type, output_format), line in zip(cases, lines):
        assert line["prompt"].startswith(f"task: {task} | type: {entity_type} | format: {output_format}\n")
        for beam in line["beams"]:
            if output_format == "ids":  # one item, of the header's type
                assert [item["type"] for item in beam["items"]] == [entity_type], (task, beam)
            elif output_format == "text":
                assert beam["items"] == [], (task, beam)
            else:  # mixed: any SID the text names is a real item
                assert all(item is not None and item["title"] is not None for item in beam["items"]), (task, beam)
