"""Data sources -> validated, random-access record stores (cached by content hash).

Accepted ``path`` forms (``data.sources: [{path, weight}]``, a plain string = weight 1):

- ``x.json``: FLAN-Mini as released, one JSON array (a file starting with ``{`` is read as JSONL)
- ``x.zip``: a zip holding exactly one ``.json``/``.jsonl`` member (the FLAN-Mini release)
- ``x.jsonl``: one record per line
- ``x.parquet``, a directory of ``*.parquet`` chunks, or a glob such as ``dir/*.parquet``
- a local ``datasets`` ``save_to_disk`` directory
- a HF datasets hub id, written ``hf://owner/name`` or ``hf://owner/name@revision`` (or bare,
  with ``allow_hub=True``), so that nothing is downloaded unless asked for; tests use local paths

Every source is converted once into ``<cache_dir>/<key>/`` (``records.jsonl`` with one
validated record per line, ``offsets.npy`` and ``meta.json``), where ``key`` hashes the
input bytes (of a hub dataset: its id, revision and ``datasets`` fingerprint), so a changed
source is re-converted and an unchanged one is reused. Records are then read by index with
``os.pread``: global shuffling and exact resumption need random access, and each host reads
only the records it is assigned.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from flacuna_jax.data.records import BadRecordLog, DataError, validate_record

FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0


def parse_sources(sources: Any) -> list[SourceSpec]:
    """Strings, ``{path, weight}`` dicts or objects with ``.path``/``.weight`` -> specs."""
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "path"):
        sources = [sources]
    specs = []
    for s in sources or ():
        if isinstance(s, (str, os.PathLike)):
            specs.append(SourceSpec(os.fspath(s)))
        elif isinstance(s, dict):
            unknown = set(s) - {"path", "weight"}
            if "path" not in s or unknown:
                raise DataError(f"bad data source {s!r}: expected {{path, weight}}")
            specs.append(SourceSpec(os.fspath(s["path"]), float(s.get("weight", 1.0))))
        else:
            specs.append(SourceSpec(os.fspath(s.path), float(getattr(s, "weight", 1.0))))
    if not specs:
        raise DataError("no data sources configured (data.sources is empty)")
    for s in specs:
        if not np.isfinite(s.weight) or s.weight < 0:
            raise DataError(f"data source {s.path}: weight must be finite and >= 0, got {s.weight}")
    if sum(s.weight for s in specs) <= 0:
        raise DataError(f"data source weights sum to 0: {[(s.path, s.weight) for s in specs]}")
    return specs


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flacuna_jax", "data")


class RecordStore:
    """Random-access validated records of one source; picklable (reopens per process)."""

    def __init__(self, directory: str, name: str):
        self.directory, self.name = directory, name
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        self._offsets = np.load(os.path.join(directory, "offsets.npy"))
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def read_bytes(self, i: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(os.path.join(self.directory, "records.jsonl"), os.O_RDONLY), os.getpid()
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return os.pread(self._fd, end - start, start)

    def __getitem__(self, i: int) -> dict:
        return json.loads(self.read_bytes(int(i)))

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}


def open_source(path: str, *, cache_dir: str | None = None, on_bad_record: str = "error",
                allow_hub: bool = False) -> RecordStore:
    """Converts (once) and opens one source; raises :class:`DataError` on bad input."""
    log = BadRecordLog(on_bad_record)  # validates the policy before any work
    kind, key_material, reader = _resolve(path, allow_hub)
    key = hashlib.sha256(f"v{FORMAT_VERSION}:{kind}:{key_material}".encode()).hexdigest()[:32]
    directory = os.path.join(cache_dir or default_cache_dir(), key)
    if not os.path.exists(os.path.join(directory, "meta.json")):
        _convert(reader(), directory, path, log)
    store = RecordStore(directory, path)
    skipped = store.meta["skipped"]
    if skipped and on_bad_record == "error":
        raise DataError(f"{store.meta['skip_examples'][0]} ({skipped} bad records in {path}; "
                        "set data.on_bad_record=skip to skip them)")
    return store


def _convert(records: Iterable[tuple[str, str, Any]], directory: str, path: str,
             log: BadRecordLog) -> None:
    """Writes the store into a private temporary directory renamed into place at the end: a failed
    conversion removes it, and of two racing conversions the loser removes its own copy."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        _write_store(records, tmp, path, log)
        try:
            os.rename(tmp, directory)  # atomic; another process may have won the race
        except OSError:
            if not os.path.exists(os.path.join(directory, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless this conversion failed or lost


def _write_store(records: Iterable[tuple[str, str, Any]], tmp: str, path: str, log: BadRecordLog) -> None:
    offsets, n = [0], 0
    with open(os.path.join(tmp, "records.jsonl"), "wb") as out:
        for where, default_id, obj in records:
            if isinstance(obj, DataError):
                log.bad(obj)
                continue
            try:
                rec = validate_record(obj, where, default_id)
            except DataError as e:
                log.bad(e)
                continue
            line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            out.write(line)
            offsets.append(offsets[-1] + len(line))
            n += 1
    if n == 0 and log.count == 0:
        raise DataError(f"{path}: no records (empty file or dataset)")
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    meta = {"source": path, "records": n, "skipped": log.count, "skip_examples": log.examples,
            "format_version": FORMAT_VERSION}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _file_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing data",
              disable=total < (256 << 20)) as bar:
        for p in paths:
            h.update(os.path.basename(p).encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def _resolve(path: str, allow_hub: bool):
    """-> (kind, key material, reader factory yielding (where, default_id, obj | DataError))."""
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{path}: no files match this pattern")
        return "parquet", _file_hash(files), lambda: _read_parquet(files)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or \
                os.path.exists(os.path.join(path, "state.json")) or \
                os.path.exists(os.path.join(path, "dataset_dict.json")):
            files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
            files = [f for f in files if os.path.isfile(f)]
            return "disk", _file_hash(files), lambda: _dataset_rows(_load_hf(path, hub=False), path)
        files = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not files:
            raise DataError(f"{path}: directory has neither *.parquet files nor a "
                            "datasets save_to_disk layout")
        return "parquet", _file_hash(files), lambda: _read_parquet(files)
    if os.path.isfile(path):
        if path.endswith(".zip"):
            return "zip", _file_hash([path]), lambda: _read_zip(path)
        if path.endswith(".parquet"):
            return "parquet", _file_hash([path]), lambda: _read_parquet([path])
        if path.endswith((".json", ".jsonl")):
            return "json", _file_hash([path]), lambda: _read_json_file(path)
        raise DataError(f"{path}: unknown data format (expected .json, .jsonl, .zip, .parquet)")
    hub_id = path[len("hf://"):] if path.startswith("hf://") else (path if allow_hub else "")
    hub_id, _, revision = hub_id.partition("@")
    if hub_id.count("/") == 1 and not hub_id.startswith((".", "/")):
        # Loaded before the key is known: the fingerprint changes with the revision and the data files.
        ds = _load_hf(hub_id, hub=True, revision=revision or None)
        return "hub", f"{hub_id}@{revision}:{ds._fingerprint}", lambda: _dataset_rows(ds, path)
    raise DataError(f"{path}: no such file or directory"
                    + ("" if allow_hub else " (write hf://owner/name for a HF hub dataset)"))


def _read_json_file(path: str):
    with open(path, "rb") as f:
        records = _read_json_bytes(f.read(), path)  # the generator owns the only copy
    yield from records


def _read_zip(path: str):
    with zipfile.ZipFile(path) as z:
        members = [m for m in z.namelist() if m.endswith((".json", ".jsonl"))
                   and not m.startswith("__MACOSX")]
        if len(members) != 1:
            raise DataError(f"{path}: expected exactly one .json/.jsonl member, found {members}")
        records = _read_json_bytes(z.read(members[0]), f"{path}!{members[0]}")
    yield from records


def _line_col(data: bytes | str, pos: int) -> tuple[int, int]:
    nl = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(nl, 0, pos) + 1
    return line, pos - (data.rfind(nl, 0, pos) + 1) + 1


def _read_json_bytes(data: bytes, name: str) -> Iterator[tuple[str, str, Any]]:
    stripped = data.lstrip()
    if not stripped:
        raise DataError(f"{name}: empty file")
    if stripped[:1] == b"{":
        yield from _read_jsonl(data, name)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(data, e.start)
        raise DataError(f"{name}:{line}:{col}: invalid UTF-8 at byte offset {e.start}") from None
    del data, stripped  # keep one copy of a multi-GB file in memory, not two
    yield from _read_json_array(text, name)


def _read_json_array(text: str, name: str) -> Iterator[tuple[str, str, Any]]:
    """Streams the elements of a top-level JSON array (no second copy of the data)."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    pos = len(text) - len(text.lstrip(ws))
    if text[pos:pos + 1] != "[":
        line, col = _line_col(text, pos)
        raise DataError(f"{name}:{line}:{col}: expected a JSON array of records (or JSONL)")
    pos += 1
    i, line, counted = 0, 1, 0
    with tqdm(total=len(text), unit="B", unit_scale=True, desc=f"converting {os.path.basename(name)}",
              disable=len(text) < (64 << 20)) as bar:
        while True:
            while pos < len(text) and text[pos] in ws:
                pos += 1
            if text[pos:pos + 1] == "]" and i == 0:
                pos += 1
                break
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                line, col = _line_col(text, e.pos)
                raise DataError(f"{name}:{line}:{col}: malformed JSON in record {i}: {e.msg}") from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield f"{name}: record {i} (line {line})", str(i), obj
            bar.update(end - pos)
            pos = end
            while pos < len(text) and text[pos] in ws:
                pos += 1
            c = text[pos:pos + 1]
            pos += 1
            i += 1
            if c == "]":
                break
            if c != ",":
                line, col = _line_col(text, pos - 1)
                raise DataError(f"{name}:{line}:{col}: malformed JSON after record {i - 1}: "
                                "expected ',' or ']'")
    if text[pos:].strip(ws):
        line, col = _line_col(text, pos)
        raise DataError(f"{name}:{line}:{col}: extra data after the JSON array")


def _read_jsonl(data: bytes, name: str) -> Iterator[tuple[str, str, Any]]:
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, str(lineno), DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line")
            continue
        except json.JSONDecodeError as e:
            yield where, str(lineno), DataError(f"{where}:{e.colno}: malformed JSON: {e.msg}")
            continue
        yield where, str(lineno - 1), obj


def _read_parquet(files: list[str]):
    import pyarrow.parquet as pq
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{f}: cannot read parquet: {e}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{f}: row {i}", f"{os.path.basename(f)}:{i}", row


def _load_hf(path: str, hub: bool, revision: str | None = None):
    import datasets
    try:
        ds = datasets.load_dataset(path, split="train", revision=revision) if hub else datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: cannot load dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split: {list(ds)}")
        ds = ds["train"]
    return ds


def _dataset_rows(ds, path: str):
    for i, row in enumerate(tqdm(ds, desc=f"converting {path}", disable=len(ds) < 100_000)):
        yield f"{path}: row {i}", str(i), row
