"""Run directories on a local disk or in a bucket (`output_dir: gs://bucket/runs/x`), through one code path.

Every file a run writes or reads back (config.yaml, metrics.jsonl, checkpoints, their specs) goes
through `etils.epath.Path`, which is a `pathlib.Path` for local paths and reaches `gs://` (and `s3://`)
through fsspec (`gcsfs`, in the `tpu` extra). Orbax writes the arrays through TensorStore, which
speaks GCS itself; TensorBoard's event files go through tensorboardX's own GCS writer
(`google-cloud-storage`). A local path is made absolute (orbax wants one); a URL is kept as it is
(`pathlib` would fold `gs://b` into `gs:/b`).

A bucket has no append and no atomic rename, so files that grow (metrics.jsonl) are rewritten whole
through a temporary sibling and a replace: on a local disk that is atomic, and fsync'd; on GCS each
upload is atomic and the previous object stays readable until the copy is complete.
"""

from __future__ import annotations

import io
import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as given, a local path made absolute."""
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Replaces `path`'s content with `text` all at once (a reader sees the old or the new file)."""
    tmp = path.parent / (path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            try:
                fd = f.fileno()
            except (AttributeError, io.UnsupportedOperation):  # an object store's file: atomic by upload
                fd = None
            if fd is not None:  # a local file is on disk before it replaces the old one
                f.flush()
                os.fsync(fd)
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
