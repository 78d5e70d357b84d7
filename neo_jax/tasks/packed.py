"""Packed binary records: a few text fields and int32 / float32 arrays, read without parsing JSON.

The task and preference records (`neo_jax.tasks.records`, `neo_jax.tasks.preference`) are written
this way. Layout, little-endian:
- the magic `NJP1`, then `uint16` text count and `uint16` array count;
- per text, its UTF-8 byte length (`uint32`); per array, a dtype code (`uint8`: 0 int32, 1 float32)
  and its element count (`uint32`);
- the texts' bytes, zero padding to a multiple of 4, then each array's bytes (4-byte elements, so
  every array starts aligned).
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np

from neo_jax.errors import UserError

MAGIC = b"NJP1"
DTYPES = (np.dtype("<i4"), np.dtype("<f4"))  # by code
_COUNTS = struct.Struct("<HH")


def pack(texts: Sequence[str], arrays: Sequence[np.ndarray]) -> bytes:
    """`texts` and 1-D `arrays` (int32 or float32) as one record."""
    encoded = [t.encode("utf-8") for t in texts]
    typed = []
    for array in arrays:
        kind = np.asarray(array).dtype.kind
        if kind not in "iuf":
            raise TypeError(f"packed arrays hold numbers, got dtype {np.asarray(array).dtype}")
        typed.append(np.ascontiguousarray(array, DTYPES[kind == "f"]).reshape(-1))
    header = [MAGIC, _COUNTS.pack(len(encoded), len(typed))]
    header += [struct.pack("<I", len(e)) for e in encoded]
    header += [struct.pack("<BI", int(a.dtype == DTYPES[1]), a.size) for a in typed]
    text = b"".join(encoded)
    head = b"".join(header) + text
    return head + bytes(-len(head) % 4) + b"".join(a.tobytes() for a in typed)


def unpack(data: bytes) -> tuple[list[str], list[np.ndarray]]:
    """`(texts, arrays)` of a record written by `pack`; the arrays are read-only views of `data`."""
    if data[:4] != MAGIC:
        raise UserError(f"not a packed neo_jax record (it starts {bytes(data[:12])!r}); records written by an "
                        "older neo_jax are JSON: write them again (`neo-jax data records`, or rerun `neo-jax align`)")
    try:
        return _read(data)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        raise UserError(f"a packed neo_jax record of {len(data)} bytes does not match its header: the record is "
                        "damaged") from None


def _read(data: bytes) -> tuple[list[str], list[np.ndarray]]:
    n_texts, n_arrays = _COUNTS.unpack_from(data, 4)
    offset = 4 + _COUNTS.size
    text_sizes = struct.unpack_from(f"<{n_texts}I", data, offset)
    offset += 4 * n_texts
    array_specs = [struct.unpack_from("<BI", data, offset + 5 * i) for i in range(n_arrays)]  # (dtype code, size)
    offset += 5 * n_arrays
    texts = []
    for size in text_sizes:
        texts.append(bytes(data[offset:offset + size]).decode("utf-8"))
        offset += size
    offset += -offset % 4
    arrays = []
    for code, size in array_specs:
        arrays.append(np.frombuffer(data, DTYPES[code], count=size, offset=offset))  # ValueError if cut short
        offset += 4 * size
    if offset != len(data):
        raise ValueError("bytes after the last array")
    return texts, arrays
