"""One recipe entry's rows, read through ``datasets`` (a hub id and a local file work the same way).

``path`` may be ``hf://owner/name[@revision]`` (with the entry's ``config``, ``split``,
``data_files``, ``streaming``), a local ``.json``/``.jsonl`` (JSON array or lines), ``.parquet``,
``.csv``, a directory of such files or a glob, or a ``datasets`` ``save_to_disk`` directory.
Without ``streaming`` a source becomes a memory-mapped Arrow table in the ``datasets`` cache
(read by index, nothing held in RAM); with it, rows are streamed in order (``datasets``'
``IterableDataset``), once to count them if the hub does not say how many there are, and once
to read the sampled ones. Only the sampled rows are ever decoded.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import numpy as np

from flacuna_jax.data.records import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
             ".parquet": "parquet", ".csv": "csv"}
_BATCH = 512


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
                return datasets.load_dataset(hub_id, e.config, data_files=e.data_files,
                                             revision=revision or None, **kw)
            if any(c in path for c in "*?["):
                files = sorted(glob.glob(path))
                if not files:
                    raise DataError(f"{path}: no files match this pattern")
                return datasets.load_dataset(_builder_for(files, path), data_files=files, **kw)
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
                return datasets.load_dataset(_builder_for(files, path), data_files=files, **kw)
            if os.path.isfile(path):
                return datasets.load_dataset(_builder_for([path], path), data_files=[path], **kw)
        except DataError:
            raise
        except Exception as err:  # datasets and pyarrow raise many types; one line naming the source
            msg = " ".join(str(err).split())[:500]
            raise DataError(f"{path}: cannot load ({type(err).__name__}: {msg})") from None
        raise DataError(f"{path}: no such file or directory (write hf://owner/name for a HF hub dataset)")

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

    def rows(self, indices: np.ndarray | None = None, columns: list[str] | None = None
             ) -> Iterator[tuple[int, dict]]:
        """``(index, row)`` for the sorted ``indices`` (all rows when None), in index order."""
        ds = self.ds
        if columns is not None:
            present = [c for c in columns if c in (ds.column_names or columns)]
            ds = ds.select_columns(present)
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
        for batch in ds.iter(batch_size=_BATCH):
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
