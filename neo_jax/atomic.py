"""Writes that leave nothing half-done: build under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from neo_jax.errors import UserError


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False,
                      overwrite_option: str | None = "--overwrite") -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; rename it to `out_dir` on success.

    On any exception the temporary directory is removed and `out_dir` is untouched.
    An existing `out_dir` is an error unless `overwrite` is set; the error names the command's
    `overwrite_option` (None: it has none).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        remedy = "remove it or choose another output directory"
        if overwrite_option is not None:
            remedy = f"pass {overwrite_option} to replace it, or {remedy}"
        raise UserError(f"{out_dir} already exists; {remedy}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the output is an ordinary directory
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
