"""`export-hf` serves elsewhere: transformers loads the model and its tokenizer, the tokenizer encodes
mixed text and SIDs to our ids, and transformers' beam search under the `neo_jax.hf.sid_logits`
processor ranks the items our constrained beam search ranks, in the same order."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

import test_export_bundle
from neo_jax import cli
from neo_jax.checkpoint import save_model
from neo_jax.decode.commands import load_generator
from neo_jax.decode.generate import DecodeSettings, ItemRef, split_sids
from neo_jax.errors import UserError
from neo_jax.hf.sid_logits import SID_CATALOG, SidAnswerComplete, SidCatalog, SidLogitsProcessor
from neo_jax.model.config import ModelConfig
from neo_jax.tokenizer import MixedTokenizer, SentencePieceTokenizer, train_sentencepiece
from neo_jax.tokenizer.hf_files import mixed_to_tokenizers
from neo_jax.vocab import EntityType, VocabLayout, format_sid

exported = test_export_bundle.run  # the fixture: a training run's final/, its bundle, the catalog, the mesh
MISTRAL_MODEL = Path("/work/shared/data/tokenizers/mistral_v1_32k.model")
BEAMS = 5


def varied_texts(catalog, seed: int = 0) -> list[str]:
    """Item texts, cut and joined at random, random characters (runs of spaces, digits, unseen ones), edge cases."""
    rng = random.Random(seed)
    texts = [catalog.item_text(row) for row in range(len(catalog))]
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'-\n\t  éü日本🙂")
    cut = [a[rng.randint(0, len(a)):] + " " + b[:rng.randint(0, len(b))] for a, b in zip(texts, reversed(texts))]
    chars = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    return texts + cut + chars + ["", " ", "  two leading", "trailing  ", "a  b   c", "\n\n", "12345 items $3.99"]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "mistral"])
def test_rebuilt_sentencepiece_encodes_text_as_sentencepiece_does(exported, tmp_path, kind):
    _, catalog, _ = exported
    if kind == "mistral":
        if not MISTRAL_MODEL.is_file():
            pytest.skip(f"{MISTRAL_MODEL} not present")
        text = SentencePieceTokenizer.from_file(MISTRAL_MODEL)
    else:
        items = [catalog.item_text(row) for row in range(len(catalog))]
        text = train_sentencepiece(items, 400, tmp_path / "text.model", model_type=kind)
    rebuilt = text.to_tokenizers()
    for string in varied_texts(catalog):
        assert rebuilt.encode(string, add_special_tokens=False).ids == text.encode(string), repr(string)


def test_a_sentencepiece_model_it_cannot_rebuild_is_refused_by_name(tmp_path):
    model = tmp_path / "nfkc.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a tiny corpus of words"] * 50),
                                   model_prefix=str(tmp_path / "nfkc"), vocab_size=20,
                                   normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(UserError) as error:
        SentencePieceTokenizer.from_file(model).to_tokenizers()
    assert str(error.value) == (f"{model}: this sentencepiece model cannot be written as a tokenizer.json: it uses "
                                "normalization rule 'nmt_nfkc' (only 'identity' is rebuilt)")


def test_text_ids_the_text_tokenizer_leaves_unused_keep_the_sid_tokens_at_their_layout_ids(exported):
    root, _, _ = exported
    text = SentencePieceTokenizer.from_file(root / "text.model")
    layout = VocabLayout(text.vocab_size + 3, (EntityType("product", (4, 4)),), pad_multiple=32)  # like a model's
    mixed = MixedTokenizer(text, layout)  # embedding with more rows than its tokenizer has tokens
    rebuilt = mixed_to_tokenizers(mixed)
    assert [rebuilt.token_to_id(t) for t in mixed.non_text_tokens] == list(range(layout.specials_start, layout.size))
    string = f"Try {format_sid('product', (3, 1))} next, or{format_sid('product', (0, 0))}."
    assert rebuilt.encode(string, add_special_tokens=False).ids == mixed.encode(string)


@pytest.fixture(scope="module")
def hf_export(exported, tmp_path_factory):
    """`(export-hf directory, transformers model, transformers tokenizer, our generator)` of the run's final/."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, _, mesh = exported
    out = tmp_path_factory.mktemp("export_hf") / "hf"
    assert cli.main(["export-hf", str(root / "final"), str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    return out, model, tokenizer, load_generator(root / "final", None, mesh)


def mixed_strings(catalog) -> list[str]:
    """Prompts of every task format, and text with SIDs of every type in every position."""
    ids_prompts, _, free = test_export_bundle.prompts(catalog)
    sids = [format_sid(name, (level, 15 - level)) for level, name in enumerate(catalog.type_names)]
    texts = [text[:60] for text in varied_texts(catalog, seed=1)[::7]]
    glued = ["".join(part for pair in zip(texts[i:i + 3], sids) for part in pair) for i in range(0, len(texts), 3)]
    return ids_prompts + free + glued + [" ".join(sids), "".join(sids), f"[SID]{sids[0]}[/SID][PAD] x[PAD]",
                                         f"  {sids[-1]}  trailing  "]


def test_exported_tokenizer_encodes_mixed_strings_to_our_ids(exported, hf_export):
    root, catalog, _ = exported
    out, _, tokenizer, generator = hf_export
    ours = generator.tokenizer
    assert isinstance(ours, MixedTokenizer) and type(tokenizer).__name__ == "TokenizersBackend"
    for string in mixed_strings(catalog):
        assert tokenizer.encode(string, add_special_tokens=False) == ours.encode(string), repr(string)
        assert tokenizer(string)["input_ids"] == [ours.bos_id] + ours.encode(string), repr(string)
    layout = ours.layout
    assert tokenizer.convert_tokens_to_ids(ours.non_text_tokens) == list(range(layout.specials_start, layout.size))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)
    assert len(tokenizer) == layout.size


def hf_ranking(hf_export, catalog: SidCatalog, prompt: str, entity_types: list[str]) -> list[str | None]:
    """The item ids transformers' constrained beam search ranks for an ID-mode prompt, best first."""
    import torch

    _, model, tokenizer, _ = hf_export
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + [catalog.sid_open_id]])  # BOS, prompt, `[SID]`
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=BEAMS, num_return_sequences=BEAMS,
                             do_sample=False, length_penalty=0.0, max_new_tokens=catalog.max_levels,
                             logits_processor=[SidLogitsProcessor(catalog, entity_types, "ids")],
                             stopping_criteria=[SidAnswerComplete(catalog)], pad_token_id=catalog.eos_id)
    return [catalog.item_of(row[ids.shape[1]:]) for row in out.tolist()]


def test_transformers_constrained_beam_search_ranks_the_items_ours_does(exported, hf_export):
    _, catalog, _ = exported
    out, _, _, generator = hf_export
    sid_catalog = SidCatalog.load(out)
    ids_prompts, _, _ = test_export_bundle.prompts(catalog)
    rows = generator.rank_items(ids_prompts, DecodeSettings("beam", max_new_tokens=4, beam_size=BEAMS))
    for prompt, ranked in zip(ids_prompts, rows.tolist()):
        entity_type = prompt.split("type: ")[1].split(" |")[0]
        ours = [catalog.item_ids[row] for row in ranked]
        assert hf_ranking(hf_export, sid_catalog, prompt, [entity_type]) == ours, prompt
        assert {catalog.type_name(row) for row in ranked} == {entity_type}


def test_transformers_mixed_generation_leaves_text_free_and_names_only_catalog_items(exported, hf_export):
    import torch

    _, catalog, _ = exported
    out, model, tokenizer, generator = hf_export
    sid_catalog = SidCatalog.load(out)
    product = catalog.type_names[0]
    layout = generator.tokenizer.layout
    prompt = (f"task: explain | type: {product} | format: mixed\nHistory: {format_sid(product, (0, 1))}\n"
              f"Suggest the next {product} with a reason.")
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + [sid_catalog.sid_open_id]])  # the answer opens with an item
    processor = SidLogitsProcessor(sid_catalog, [product], "mixed")
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, num_return_sequences=3,
                                   do_sample=False, max_new_tokens=12, logits_processor=[processor],
                                   pad_token_id=sid_catalog.eos_id)[:, ids.shape[1] - 1:].tolist()
    items = [piece for row in generated for piece in split_sids(row, layout, generator.sids.trie)
             if isinstance(piece, ItemRef)]
    assert items and all(item.row is not None and item.entity_type == product for item in items)
    assert any(t < layout.text_size and t != sid_catalog.eos_id for row in generated for t in row)  # text, too
    assert all(t < layout.size and t != layout.special_id("[PAD]") for row in generated for t in row)


def test_export_hf_says_what_it_leaves_out_and_refuses_a_mismatched_sid_catalog(exported, random_decoder, tmp_path,
                                                                                 capsys):
    root, _, _ = exported
    assert cli.main(["export-hf", str(root / "final"), str(tmp_path / "hf")]) == 0
    line = capsys.readouterr().out
    assert "1 safetensors file(s), config.json, sid_catalog.json, tokenizer.json, tokenizer_config.json)" in line
    catalog = json.loads((tmp_path / "hf" / SID_CATALOG).read_text())
    assert len(catalog["item_ids"]) == len(exported[1]) and catalog["eos_id"] == 2
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=16, intermediate_size=16,
                         num_layers=1, num_heads=1, num_kv_heads=1, head_dim=16)
    save_model(tmp_path / "bare", random_decoder(config))
    assert cli.main(["export-hf", str(tmp_path / "bare"), str(tmp_path / "bare_hf")]) == 0
    assert capsys.readouterr().out.endswith(f"; no tokenizer: {tmp_path / 'bare' / 'tokenizer'} is not a directory "
                                            "(pass --tokenizer)\n")
    other = shutil.copytree(root / "sids", tmp_path / "other_sids")
    summary = json.loads((other / "summary.json").read_text())
    summary["entity_types"][0]["codebook_sizes"] = [16, 8]
    (other / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["export-hf", str(root / "final"), str(tmp_path / "bad"), "--sids", str(other)]) == 2
    assert "SID blocks do not match" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main(["export-hf", str(root / "final"), str(tmp_path / "bad"), "--tokenizer", str(tmp_path)]) == 2
    assert f"{tmp_path}: directory holds neither" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_damaged_sid_catalog_is_refused_in_one_line(tmp_path):
    (tmp_path / SID_CATALOG).write_text(json.dumps({"format": "neo_jax SID catalog", "format_version": 1}))
    with pytest.raises(ValueError, match="the SID catalog lacks 'text_size'"):
        SidCatalog.load(tmp_path)
    (tmp_path / SID_CATALOG).write_text("{")
    with pytest.raises(ValueError, match="cannot read the SID catalog"):
        SidCatalog.load(tmp_path)


def tiny_catalog() -> SidCatalog:
    """Text ids 0..4 (EOS 2), `[SID]` 5, `[/SID]` 6, `[PAD]` 7; type `a` of two levels (codes 8-9, 10-11) and
    `b` of three (12, 13-14, 15); two padding rows follow (16, 17)."""
    return SidCatalog({"format": "neo_jax SID catalog", "format_version": 1, "text_size": 5, "vocab_size": 16,
                       "sid_open_id": 5, "sid_close_id": 6, "eos_id": 2, "entity_types": ["a", "b"],
                       "item_ids": ["a0", "a1", "a2", "b0", "b1"], "item_types": [0, 0, 0, 1, 1],
                       "item_tokens": [[8, 10], [8, 11], [9, 10], [12, 13, 15], [12, 14, 15]]}, "tiny")


@pytest.mark.parametrize("output_format, types, tokens, allowed", [
    ("ids", ["a"], [1, 5], [8, 9]),
    ("ids", None, [1, 5], [8, 9, 12]),
    ("ids", ["b"], [5, 12, 13, 15, 6, 3, 5], [12]),  # a closed SID in the prompt, then the answer's
    ("ids", ["a"], [1, 5, 8], [10, 11]),
    ("ids", ["a"], [1, 5, 9], [10]),
    ("ids", ["a"], [1, 5, 8, 10], [6]),
    ("ids", ["a"], [1, 5, 8, 10, 6], [2]),
    ("ids", ["a"], [1, 5, 8, 9], []),  # off the trie: nothing
    ("mixed", ["b"], [1, 3], [0, 1, 2, 3, 4, 5]),
    ("mixed", ["b"], [1, 5], [12]),
    ("mixed", ["b"], [1, 5, 12, 14, 15, 6], [0, 1, 2, 3, 4, 5]),
    ("text", None, [1, 3], [0, 1, 2, 3, 4]),
])
def test_the_processor_allows_the_trie_inside_a_span_and_the_format_outside(output_format, types, tokens, allowed):
    processor = SidLogitsProcessor(tiny_catalog(), types, output_format)
    assert list(processor.allowed(tokens)) == allowed


def test_the_processor_renormalises_over_real_tokens_and_the_answer_ends_at_its_last_code():
    torch = pytest.importorskip("torch")
    catalog = tiny_catalog()
    input_ids = torch.tensor([[1, 5, 8, 10], [1, 5, 12, 13], [1, 5, 12, 14], [5, 8, 10, 6]])  # a0, b0 and b1
    # open at their last level, a0 closed
    scores = torch.randn(4, 18).log_softmax(-1)  # [rows, vocab]: the padding rows have a share
    out = SidLogitsProcessor(catalog, None, "ids")(input_ids, scores)
    expected = scores[:, :16].log_softmax(-1)  # [rows, real]
    assert torch.isinf(out).sum(dim=1).tolist() == [17, 17, 17, 17]
    torch.testing.assert_close(out[[0, 1, 2, 3], [6, 15, 15, 2]], expected[[0, 1, 2, 3], [6, 15, 15, 2]])
    assert SidAnswerComplete(catalog)(input_ids, None).tolist() == [True, False, False, False]
    assert catalog.item_of([12, 14, 15, 2, 2]) == "b1" and catalog.item_of([8]) is None
    with pytest.raises(ValueError, match=r"entity types \['c'\] must be a non-empty list of the catalog's"):
        SidLogitsProcessor(catalog, ["c"])
