"""`neo-jax tokenizer build`: a trained text model plus the SID blocks of a `sids build` output."""


import pytest

from neo_jax.catalog.commands import SidsBuildConfig, build_sids
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.cli import main
from neo_jax.data.synthetic import SynthConfig
from neo_jax.tasks.builders import read_examples
from neo_jax.tokenizer import MixedTokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    assert main(["data", "synth", str(root / "data"), "--num-items", "200", "--num-users", "60",
                 "--num-queries", "20"]) == 0
    build_sids(SidsBuildConfig(data=str(root / "data"), output=str(root / "sids"),
                               synthetic=SynthConfig(num_items=200)))
    assert main(["data", "tasks", str(root / "data"), str(root / "sids" / "sids.tsv"), str(root / "tasks")]) == 0
    assert main(["tokenizer", "build", str(root / "tok"), "--sids", str(root / "sids"),
                 "--train", str(root / "tasks"), "--vocab-size", "400"]) == 0
    return root


def test_layout_carries_every_sid_block_and_examples_round_trip(built):
    tokenizer = MixedTokenizer.load(built / "tok")
    sids = load_sid_output(built / "sids")
    assert tokenizer.layout.text_size == 400
    assert tokenizer.layout.entity_types == sids.entity_types
    assert tokenizer.layout.padded_size % 128 == 0
    for example in read_examples(built / "tasks" / "train.jsonl")[:50]:
        text = example.prompt + example.completion
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids) < tokenizer.layout.size


def test_bad_sources_are_clear_errors(built, capsys):
    assert main(["tokenizer", "build", str(built / "bad"), "--sids", str(built / "sids"),
                 "--text", str(built / "missing.model")]) == 2
    assert "missing.model" in capsys.readouterr().err
    assert main(["tokenizer", "build", str(built / "bad"), "--sids", str(built / "data"),
                 "--text", str(built / "tok")]) == 2
    assert "sids build" in capsys.readouterr().err
    assert not (built / "bad").exists()
