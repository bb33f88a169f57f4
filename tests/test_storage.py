"""Run directories through etils.epath: a bucket URL is kept whole, and the files a run writes go
through operations a bucket has (no append), tested on a local path given the same way."""

import json
import os

import pytest
from etils import epath

from flacuna_jax import checkpoint, metrics, storage


def test_urls_are_kept_whole_and_local_paths_made_absolute(tmp_path, monkeypatch):
    run = storage.run_path("gs://my-bucket/runs/flacuna")
    assert str(run / "metrics.jsonl") == "gs://my-bucket/runs/flacuna/metrics.jsonl"  # pathlib: gs:/my-bucket/...
    assert str(checkpoint.checkpoint_dir("gs://my-bucket/runs/flacuna")) == "gs://my-bucket/runs/flacuna/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(storage.run_path("runs/x")) == str(tmp_path / "runs/x")
    assert isinstance(storage.run_path("runs/x"), epath.Path)


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = storage.run_path(tmp_path / "f.txt")
    storage.write_text_atomic(path, "one\n")
    storage.write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n" and sorted(os.listdir(tmp_path)) == ["f.txt"]

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # a local write that cannot reach the disk: the old file stays
    with pytest.raises(OSError, match="disk full"):
        storage.write_text_atomic(path, "three\n")
    assert path.read_text() == "two\n" and sorted(os.listdir(tmp_path)) == ["f.txt"]


@pytest.fixture
def bucket_like(monkeypatch):
    """epath files without append or fileno, as on GCS (gcsfs) and other object stores."""
    real_open = epath.Path.open

    class NoFileno:
        def __init__(self, f):
            self._f = f

        def __getattr__(self, name):
            if name == "fileno":
                raise AttributeError("fileno")
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def open_(self, mode="r", *args, **kwargs):
        assert "a" not in mode, f"append ({mode}) on {self}: a bucket has none"
        return NoFileno(real_open(self, mode, *args, **kwargs))

    monkeypatch.setattr(epath.Path, "open", open_)


def test_metrics_are_written_and_resumed_without_append(tmp_path, bucket_like):
    log = metrics.MetricsLogger(str(tmp_path / "run"), total_steps=4, tensorboard=False, progress=False)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    path = tmp_path / "run" / "metrics.jsonl"
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]
    resumed = metrics.MetricsLogger(str(tmp_path / "run"), total_steps=4, start_step=2, tensorboard=False, progress=False)
    resumed.log({"step": 3, "loss": 0.25})  # the step after the checkpoint, logged again
    resumed.close()
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 0.5, 0.25]
