"""The shared JSON reader names the file and the problem."""

import pytest

from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object


def test_reads_an_object(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"x": 1}')
    assert read_json_object(path) == {"x": 1}


@pytest.mark.parametrize("content, message", [
    (b'{"x": ', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_bad_content_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"bad.json: {message}"):
        read_json_object(path)


def test_missing_file_carries_the_hint(tmp_path):
    with pytest.raises(UserError, match=r"nope.json: not found; is this a run\?"):
        read_json_object(tmp_path / "nope.json", "is this a run?")
