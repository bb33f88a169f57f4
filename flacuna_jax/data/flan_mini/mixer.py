"""Build FLAN-Mini: every entry's shard (in this process or in worker processes), then one seeded
interleave into the released layout, and the data card.

Output, in ``out``: ``flan_mini.json`` (a JSON array of ``{"id", "source", "conversations"}``
records, one per line, as ``train`` reads the released file), or with ``zip_output``
``flan_mini.json.zip`` holding it as its one member (the release's layout); ``stats.json``
and ``DATA_CARD.md``. Each is written to a temporary name and renamed into place, so a failed
build leaves an earlier one untouched.

Order: record ``j`` of the output comes from the source that a seeded permutation of the
per-source counts puts at slot ``j``, and each source's records follow its key order; the
whole file is thus a uniform shuffle, fixed by the recipe and seed alone. The same recipe and
seed give the same bytes whatever the number of workers or the machine (the zip container
also needs the same zlib; the JSON inside it is the same bytes regardless).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np

from flacuna_jax.data.flan_mini import card
from flacuna_jax.data.flan_mini.recipe import Recipe
from flacuna_jax.data.flan_mini.sampling import key_order, stream_seed, unit_keys
from flacuna_jax.data.flan_mini.shard import ShardResult, build_shard

OUTPUT_NAME = "flan_mini.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: the zip bytes do not depend on the clock


def _log(msg: str) -> None:
    print(f"[flan_mini] {msg}", file=sys.stderr, flush=True)


TOKEN_SAMPLE = 10_000


def build(recipe: Recipe, out: str, *, scale: float = 1.0, seed: int | None = None, workers: int = 1,
          zip_output: bool = False, tokenizer: str | None = None, token_sample: int = TOKEN_SAMPLE,
          cache_dir: str | None = None) -> dict:
    """Builds ``recipe`` (counts times ``scale``) into ``out``; returns the stats (``stats.json``).

    With a ``tokenizer``, the card's token lengths are measured on the first ``token_sample``
    records of each source in key order, a uniform sample (0: every record): SentencePiece
    encodes ~2 MB/s, so every record of a full build would cost ~15 CPU-minutes."""
    recipe = recipe.scaled(scale)
    seed = recipe.seed if seed is None else seed
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if tokenizer:  # fail before any source is read, not in a worker minutes later
        from flacuna_jax import templates

        templates.SegmentTokenizer.load(tokenizer)
    os.makedirs(out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=".flan_mini-", dir=out)
    try:
        shards = _build_shards(recipe, seed, workdir, workers, cache_dir, tokenizer, token_sample)
        total = sum(s.records for s in shards)
        _log(f"interleaving {total} records from {len(shards)} sources")
        name = OUTPUT_NAME + (".zip" if zip_output else "")
        tmp = os.path.join(workdir, name)
        digest = _write_output(shards, seed, tmp, zip_output)
        stats = card.stats(recipe, scale, seed, shards, name, digest, tokenizer, token_sample)
        files = {name: tmp, "stats.json": os.path.join(workdir, "stats.json"),
                 "DATA_CARD.md": os.path.join(workdir, "DATA_CARD.md")}
        card.write(stats, recipe, files["stats.json"], files["DATA_CARD.md"])
        for final, path in files.items():
            os.replace(path, os.path.join(out, final))
        _log(f"wrote {os.path.join(out, name)} ({total} records), stats.json, DATA_CARD.md")
        return stats
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _build_shards(recipe: Recipe, seed: int, workdir: str, workers: int, cache_dir, tokenizer,
                  token_sample: int) -> list[ShardResult]:
    entries = [e for e in recipe.entries if e.count > 0]
    args = [(e, seed, workdir, cache_dir, tokenizer, token_sample) for e in entries]
    if workers == 1 or len(entries) <= 1:
        results = []
        for a in args:
            results.append(build_shard(*a))
            _report(results[-1])
        return results
    # Largest first balances the workers; results are put back in recipe order whatever finishes first.
    # The first failure surfaces as soon as it happens and stops the other workers (Pool.terminate).
    by_size = sorted(range(len(args)), key=lambda i: -entries[i].count)
    ctx = multiprocessing.get_context("spawn")  # no fork after datasets/pyarrow started threads
    results: list = [None] * len(args)
    with ctx.Pool(min(workers, len(args))) as pool:
        for i, result in pool.imap_unordered(_shard_job, [(i, args[i]) for i in by_size]):
            results[i] = result
            _report(result)
    return results


def _shard_job(job):
    i, args = job
    return i, build_shard(*args)


def _report(r: ShardResult) -> None:
    note = ", took all there was" if r.took_all else ""
    _log(f"{r.name}: {r.records} of {r.asked} records from {r.units} units in {r.rows} rows "
         f"({r.skipped_rows} bad rows skipped{note}) in {r.seconds:.1f} s")


def interleave(counts: list[int], seed: int) -> np.ndarray:
    """The source index of every output slot: each source ``i`` appears ``counts[i]`` times, in an
    order fixed by the seed (keys hashed as in sampling.py: no NumPy stream involved)."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    keys = unit_keys(stream_seed(seed, "\0interleave"), np.arange(len(labels), dtype=np.int64))
    return labels[key_order(keys)]


def _write_output(shards: list[ShardResult], seed: int, path: str, zip_output: bool) -> str:
    """Writes the JSON array (or the zip holding it); returns the JSON bytes' sha256."""
    labels = interleave([s.records for s in shards], seed)
    digest = hashlib.sha256()
    readers = [open(s.path, "rb") for s in shards]
    try:
        if zip_output:
            info = zipfile.ZipInfo(OUTPUT_NAME, date_time=_ZIP_TIME)
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 3, 0o644 << 16
            with zipfile.ZipFile(path, "w") as z, z.open(info, "w", force_zip64=True) as f:
                _write_array(readers, labels, f, digest)
        else:
            with open(path, "wb") as f:
                _write_array(readers, labels, f, digest)
    finally:
        for r in readers:
            r.close()
    return digest.hexdigest()


def _write_array(readers, labels: np.ndarray, f, digest, flush_bytes: int = 1 << 20) -> None:
    buf, size = [b"[\n"], 2

    def flush() -> None:
        data = b"".join(buf)
        f.write(data)
        digest.update(data)
        buf.clear()

    for j, label in enumerate(labels.tolist()):
        line = readers[label].readline()
        buf.append((b",\n" if j else b"") + line[:-1])
        size += len(line) + 1
        if size >= flush_bytes:
            flush()
            size = 0
    buf.append(b"\n]\n" if len(labels) else b"]\n")
    flush()

