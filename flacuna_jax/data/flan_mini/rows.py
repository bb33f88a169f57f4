"""One recipe entry's rows, read through ``datasets`` (a hub id and a local file work the same way).

``path`` may be ``hf://owner/name[@revision]`` (with the entry's ``config``, ``split``,
``data_files``, ``streaming``), a local ``.json``/``.jsonl`` (JSON array or lines), ``.parquet``,
``.csv``, a directory of such files or a glob, or a ``datasets`` ``save_to_disk`` directory. A JSON
*array* (local, or a hub entry's ``.json`` ``data_files``, fetched first) is rewritten as JSON lines
in a window before ``datasets`` sees it, which would otherwise hold all of it in memory at once.
Without ``streaming`` a source becomes a memory-mapped Arrow table in the ``datasets`` cache
(read by index, nothing held in RAM); with it, rows are streamed in order (``datasets``'
``IterableDataset``), once to count them if the hub does not say how many there are, and once
to read the sampled ones. Only the sampled rows are ever decoded.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from flacuna_jax.data.records import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
             ".parquet": "parquet", ".csv": "csv"}
_BATCH = 512
_CHUNK = 1 << 24  # characters read at a time when converting a JSON array


def _json_array_as_lines(path: str, cache_dir: str | None) -> str:
    """A local JSON *array* file as JSON lines, converted once (keyed by path, size and mtime) and
    element by element: ``datasets`` would load a whole array into memory (several times its size)
    before writing its Arrow cache. Any other file is returned as it is."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    if not head.startswith(b"["):
        return path
    import datasets

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "flacuna_jax_json_lines")
    out = os.path.join(root, f"{key}.jsonl")
    if os.path.exists(out):
        return out
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as w:
            for obj in iter_json_array(path):
                w.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def iter_json_array(path: str, chunk: int = _CHUNK) -> Iterator[Any]:
    """The elements of a top-level JSON array, parsed from a window of the file (bounded memory).
    Malformed JSON is a :class:`DataError` naming the file, the line and the element."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as f:
        buf, pos, eof, line = "", 0, False, 1

        def fill() -> bool:  # more text after pos; False at the end of the file
            nonlocal buf, pos, eof, line
            if eof:
                return False
            data = f.read(chunk)
            eof = not data
            try:
                text = utf8.decode(data, final=eof)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 near line {line + buf.count(chr(10), 0, pos)} ({e.reason})") from None
            line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + text, 0
            return True

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos:pos + 1]

        def fail(msg: str) -> DataError:
            return DataError(f"{path}:{line + buf.count(chr(10), 0, pos)}: {msg}")

        if skip_ws() != "[":
            raise fail("expected a JSON array")
        pos += 1
        if skip_ws() == "]":
            return
        i = 0
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a value that ends the window may go on in the next chunk
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise fail(f"malformed JSON in element {i}: {e.msg}") from None
                if not fill():
                    continue
            pos = end
            yield obj
            i += 1
            c = skip_ws()
            pos += 1
            if c == "]":
                break
            if c != ",":
                pos -= 1
                raise fail(f"malformed JSON after element {i - 1}: expected ',' or ']'")
        if skip_ws():
            raise fail("extra data after the JSON array")


def _builder_for(files: list[str], path: str) -> str:
    kinds = set()
    for f in files:
        ext = next((e for e in sorted(_BUILDERS, key=len, reverse=True) if f.endswith(e)), None)
        if ext is None:
            raise DataError(f"{path}: unknown data format of {f} (expected {', '.join(sorted(_BUILDERS))})")
        kinds.add(_BUILDERS[ext])
    if len(kinds) != 1:
        raise DataError(f"{path}: mixes data formats {sorted(kinds)}")
    return kinds.pop()


class RowSource:
    """The rows of one entry: ``num_rows`` (None while unknown) and ``rows(indices)``."""

    def __init__(self, entry, cache_dir: str | None = None):
        self.entry, self.cache_dir = entry, cache_dir
        self.label = entry.path + (f" [{entry.split}]" if entry.path.startswith("hf://") else "")
        self.ds = self._open()
        self.streaming = not hasattr(self.ds, "__len__")
        if self.streaming:
            self._refuse_undecoded_json()
            info = getattr(self.ds, "info", None)
            splits = getattr(info, "splits", None) or {}
            split = splits.get(entry.split) if hasattr(splits, "get") else None
            self.num_rows = getattr(split, "num_examples", None) or None
        else:
            self.num_rows = len(self.ds)

    def where(self, i: int) -> str:
        return f"{self.label}: row {i}"

    # -- opening -----------------------------------------------------------------------------------
    def _open(self):
        import datasets

        e = self.entry
        kw: dict[str, Any] = {"split": e.split, "streaming": e.streaming, "cache_dir": self.cache_dir}
        path = e.path
        try:
            if path.startswith("hf://"):
                hub_id, _, revision = path[len("hf://"):].partition("@")
                if not hub_id or hub_id.startswith((".", "/")):
                    raise DataError(f"{path}: expected hf://owner/name[@revision]")
                files = [e.data_files] if isinstance(e.data_files, str) else list(e.data_files or ())
                if files and all(f.endswith(".json") for f in files):
                    # JSON files on the hub may be arrays (ShareGPT's is 670 MB): fetched, then read as local ones
                    from huggingface_hub import hf_hub_download

                    local = [hf_hub_download(hub_id, f, repo_type="dataset", revision=revision or None) for f in files]
                    return self._load_files(local, path, kw)
                return datasets.load_dataset(hub_id, e.config, data_files=e.data_files,
                                             revision=revision or None, **kw)
            if any(c in path for c in "*?["):
                files = sorted(glob.glob(path))
                if not files:
                    raise DataError(f"{path}: no files match this pattern")
                return self._load_files(files, path, kw)
            if os.path.isdir(path):
                if any(os.path.exists(os.path.join(path, m)) for m in
                       ("dataset_info.json", "state.json", "dataset_dict.json")):
                    ds = datasets.load_from_disk(path)
                    if isinstance(ds, datasets.DatasetDict):
                        if e.split not in ds:
                            raise DataError(f"{path}: no split '{e.split}' (has {sorted(ds)})")
                        ds = ds[e.split]
                    return ds.to_iterable_dataset() if e.streaming else ds
                files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                               if os.path.isfile(f) and not os.path.basename(f).startswith("."))
                if not files:
                    raise DataError(f"{path}: empty directory")
                return self._load_files(files, path, kw)
            if os.path.isfile(path):
                return self._load_files([path], path, kw)
        except DataError:
            raise
        except Exception as err:  # datasets and pyarrow raise many types; one line naming the source
            msg = " ".join(str(err).split())[:500]
            raise DataError(f"{path}: cannot load ({type(err).__name__}: {msg})") from None
        raise DataError(f"{path}: no such file or directory (write hf://owner/name for a HF hub dataset)")

    def _load_files(self, files: list[str], path: str, kw: dict):
        import datasets

        builder = _builder_for(files, path)
        if builder == "json":
            files = [_json_array_as_lines(f, self.cache_dir) if f.endswith(".json") else f for f in files]
        return datasets.load_dataset(builder, data_files=files, **kw)

    def _refuse_undecoded_json(self) -> None:
        """A column whose rows disagree in type is a ``Json`` feature, and ``datasets`` streams it
        as undecoded JSON text (``5`` and ``"5"`` would both arrive as strings): refused rather
        than letting a wrong-typed row pass as a string."""
        features = getattr(self.ds, "features", None) or {}
        mixed = sorted(k for k, f in features.items() if type(f).__name__ == "Json")
        if mixed:
            raise DataError(f"{self.entry.path}: column(s) {mixed} hold values of different types; "
                            "set streaming: false to find the rows at fault")

    # -- reading -----------------------------------------------------------------------------------
    def count_rows(self) -> int:
        """The number of rows, counted by one pass over a stream of unknown size."""
        if self.num_rows is None:
            n = 0
            for _ in self.ds:
                n += 1
            self.num_rows = n
        return self.num_rows

    def rows(self, indices: np.ndarray | None = None, columns: list[str] | None = None, batch_size: int = _BATCH
             ) -> Iterator[tuple[int, dict]]:
        """``(index, row)`` for the sorted ``indices`` (all rows when None), in index order; rows
        are decoded ``batch_size`` at a time (small for rows of many solutions)."""
        ds = self.ds
        if columns is not None and ds.column_names is not None:  # a stream may not know its columns
            ds = ds.select_columns([c for c in columns if c in ds.column_names])
        if indices is not None:
            indices = np.asarray(indices, np.int64)
            if len(indices) and np.any(np.diff(indices) <= 0):
                raise ValueError("rows(): indices must be sorted and distinct")
        if self.streaming:
            yield from self._stream(ds, indices)
            return
        if indices is not None:
            ds = ds.select(indices)
        pos = 0
        for batch in ds.iter(batch_size=batch_size):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            for j in range(n):
                i = int(indices[pos + j]) if indices is not None else pos + j
                yield i, {k: batch[k][j] for k in keys}
            pos += n

    @staticmethod
    def _stream(ds, indices) -> Iterator[tuple[int, dict]]:
        want = 0
        for i, row in enumerate(ds):
            if indices is None:
                yield i, row
                continue
            if want >= len(indices):
                return
            if i == indices[want]:
                yield i, row
                want += 1
