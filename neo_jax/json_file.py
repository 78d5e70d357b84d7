"""Reading the small JSON files beside checkpoints, tries and tokenizers, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neo_jax.errors import UserError


def read_json_object(path: str | Path, missing_hint: str = "") -> dict[str, Any]:
    """The JSON object stored at `path`.

    A missing file (with `missing_hint` appended to the message), text that is not UTF-8 or not
    JSON, or JSON that is not an object is a `UserError` naming the file.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else "")) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
