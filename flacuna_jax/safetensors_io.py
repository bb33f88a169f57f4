"""Safetensors files read lazily through mmap, and written tensor by tensor.

The `safetensors` package's numpy API has no bfloat16, and its other APIs materialise whole tensors
on one device. Reading the format directly (an 8-byte header length, a JSON header, raw
little-endian bytes) gives zero-copy numpy views, so a loader can slice out just one shard of a
tensor. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Maps a .safetensors file; `get(name)` is a read-only numpy view (no copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (n,) = struct.unpack("<Q", self._mm[:8])
            header = json.loads(self._mm[8:8 + n])
        except (struct.error, ValueError) as e:
            raise ValueError(f"{self.path}: not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        buf = memoryview(self._mm)[self._data_start + start:self._data_start + end]
        return np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]] | dict,
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (name, array) in order; only one tensor is held as bytes at a time."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        nbytes = arr.size * arr.dtype.itemsize
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    tmp.replace(path)
