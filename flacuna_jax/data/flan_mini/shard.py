"""One recipe entry -> its shard: ``count`` records sampled without replacement, in key order.

1. Units: every row is one unit, or (``reader.expands``) one pass over the columns that say how
   many units a row holds (one per solution). Rows that fail there are bad rows.
2. Sampling: units sorted by their seeded key (``sampling.py``); the first ``count`` are read
   (in row order), checked and spilled to disk: an instruction unit as its final record, a
   templated one as its payload. A bad row is an error
   naming the source and the row, or (``on_bad_row: skip``) counted, and the next units in key
   order take its place, so the entry still gets exactly ``count`` records when the source has
   enough good ones. Fewer than ``count`` good units: an error naming the entry, unless
   ``allow_fewer`` (the card says it took all there was).
3. The shard, in key order: instruction records copied as they are; templated payloads rendered
   through the template pool, with the source's first ``POOL_SIZE`` units in key order as the
   exemplar pool (read even when ``count`` is smaller, so that a record renders the same at any
   scale). Every record is checked as ``train`` will read it; one JSON line each.

Memory: the unit index (rows, keys: 16-24 bytes a unit) and one row at a time; payloads and
records live on disk. Nothing depends on the process, so entries run in any number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter

import numpy as np

from flacuna_jax import templates
from flacuna_jax.data.flan_mini import template_pool
from flacuna_jax.data.flan_mini.readers import READERS
from flacuna_jax.data.flan_mini.recipe import Entry
from flacuna_jax.data.flan_mini.rows import RowSource
from flacuna_jax.data.flan_mini.sampling import Draws, key_order, stream_seed, unit_keys
from flacuna_jax.data.records import DataError

POOL_SIZE = 32  # exemplar pool of a templated source: its first units in key order


@dataclasses.dataclass
class ShardResult:
    name: str
    path: str  # the shard: one JSON record per line, in key order
    records: int
    asked: int
    units: int  # units in the source (rows, or solutions)
    rows: int
    took_all: bool
    skipped_rows: int
    skip_examples: list[str]
    tasks: dict[str, int]
    template_types: dict[str, int]
    shots: dict[str, int]
    chars: list[int]  # characters per record (all turns)
    tokens: list[int] | None  # template tokens of the first records in key order (with a tokenizer)
    seconds: float


class BadRows:
    def __init__(self, entry: Entry):
        self.entry, self.count, self.examples = entry, 0, []

    def bad(self, error: DataError) -> None:
        if self.entry.on_bad_row == "error":
            raise DataError(f"{error} (source '{self.entry.name}'; set on_bad_row: skip in the recipe "
                            "to count and skip bad rows)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))


def _unit_index(entry: Entry, src: RowSource, bad: BadRows, bad_rows: set[int]):
    reader = READERS[entry.reader]
    seed_rows, seed_subs = [], []
    if not reader.expands:
        rows = np.arange(src.count_rows(), dtype=np.int64)
        return rows, np.zeros(len(rows), np.int32)
    # CodeContests rows hold hundreds of solutions each: decoded a few rows at a time
    for i, row in src.rows(columns=list(reader.count_columns), batch_size=8):
        try:
            subs = reader.units(row, src.where(i))
        except DataError as e:
            bad.bad(e)
            bad_rows.add(i)
            continue
        seed_rows.append(np.full(len(subs), i, np.int64))
        seed_subs.append(np.asarray(subs, np.int32))
    rows = np.concatenate(seed_rows) if seed_rows else np.zeros(0, np.int64)
    subs = np.concatenate(seed_subs) if seed_subs else np.zeros(0, np.int32)
    return rows, subs


def build_shard(entry: Entry, seed: int, workdir: str, cache_dir: str | None = None,
                tokenizer: str | None = None, token_sample: int = 0) -> ShardResult:
    """``token_sample``: count tokens of the first that many records in key order (a uniform
    sample; 0: all of them)."""
    t0 = time.time()
    reader = READERS[entry.reader]
    src = RowSource(entry, cache_dir)
    bad, bad_rows = BadRows(entry), set()
    rows, subs = _unit_index(entry, src, bad, bad_rows)
    keys = unit_keys(stream_seed(seed, entry.name), rows, subs if reader.expands else None)
    order = key_order(keys)
    stats = _Stats()
    spill_path = os.path.join(workdir, f"{entry.name}.spill.jsonl")
    # A templated source reads at least its exemplar pool, so the pool (and every record's
    # rendering) does not depend on the count: a smaller --scale gives a subset of the records.
    wanted = max(entry.count, POOL_SIZE) if reader.templated else entry.count
    with open(spill_path, "wb") as spill:
        accepted = _read_units(entry, reader, src, rows, subs, order, wanted, bad, bad_rows, spill, stats)
    accepted.sort()
    pool, accepted = accepted[:POOL_SIZE], accepted[:entry.count]
    took_all = len(accepted) < entry.count
    if took_all and not entry.allow_fewer:
        raise DataError(f"source '{entry.name}' ({src.label}): {entry.count} records asked, only "
                        f"{len(accepted)} usable units ({len(rows)} units in {src.num_rows} rows, {bad.count} bad "
                        "rows skipped); set allow_fewer: true in the recipe to take what there is")
    shard_path = os.path.join(workdir, f"{entry.name}.jsonl")
    tok = templates.SegmentTokenizer.load(tokenizer) if tokenizer else None
    n_tok = len(accepted) if token_sample <= 0 else min(token_sample, len(accepted))
    fd = os.open(spill_path, os.O_RDONLY)
    try:
        with open(shard_path, "wb") as out:
            if reader.templated:
                _render_templated(entry, fd, accepted, pool, rows, subs, keys, order, out, stats, tok, n_tok)
            else:
                for j, (_, offset, length) in enumerate(accepted):
                    line = os.pread(fd, length, offset)
                    out.write(line)
                    if tok is not None and j < n_tok:
                        stats.tokens.append(len(templates.encode(json.loads(line)["conversations"], tok).ids))
    finally:
        os.close(fd)
        os.remove(spill_path)
    return ShardResult(entry.name, shard_path, len(accepted), entry.count, len(rows), int(src.num_rows or 0),
                       took_all, bad.count, bad.examples, dict(sorted(stats.tasks.items())),
                       dict(sorted(stats.kinds.items())), dict(sorted(stats.shots.items())), stats.chars,
                       stats.tokens if tok is not None else None, round(time.time() - t0, 2))


class _Stats:
    def __init__(self):
        self.tasks, self.kinds, self.shots = Counter(), Counter(), Counter()
        self.chars: list[int] = []
        self.tokens: list[int] = []

    def add(self, conv: list[dict], task: str, kind: str | None, shots: int | None) -> None:
        self.tasks[task] += 1
        self.kinds[kind or "as_published"] += 1
        self.shots["as_published" if shots is None else str(shots)] += 1
        self.chars.append(sum(len(t["value"]) for t in conv))


def _read_units(entry, reader, src, rows, subs, order, wanted, bad, bad_rows, spill, stats) -> list:
    """Reads units in key order until ``wanted`` are good (or none are left); spills each as one
    line: a templated unit's payload, or an instruction unit's final record (its stats counted
    here: every one of those is in the output). Returns [(rank, offset, length)]."""
    accepted, pos = [], 0
    while len(accepted) < wanted and pos < len(order):
        ranks = np.arange(pos, min(len(order), pos + wanted - len(accepted)))
        pos = int(ranks[-1]) + 1
        units = order[ranks]
        if bad_rows:  # units of rows already found bad are not read again
            keep = ~np.isin(rows[units], np.fromiter(bad_rows, np.int64))
            ranks, units = ranks[keep], units[keep]
        by_row = np.lexsort((subs[units], rows[units]))
        ranks, units = ranks[by_row], units[by_row]
        k = 0
        for i, row in src.rows(np.unique(rows[units]), columns=list(reader.columns),
                               batch_size=8 if reader.expands else 512):
            where = src.where(i)
            while k < len(units) and rows[units[k]] == i:
                rank, sub = int(ranks[k]), int(subs[units[k]])
                k += 1
                if i in bad_rows:
                    continue
                try:
                    payload = reader.unit(row, sub, where)
                except DataError as e:
                    bad.bad(e)
                    bad_rows.add(i)
                    continue
                if reader.templated:
                    payload["_row"] = i
                    obj = payload
                else:
                    obj = _record(entry, reader, i, sub, payload["conversations"])
                    stats.add(obj["conversations"], payload["task"], payload["template_type"], None)
                line = json.dumps(obj, ensure_ascii=False).encode() + b"\n"
                accepted.append((rank, spill.tell(), len(line)))
                spill.write(line)
    return accepted


def _render_templated(entry, fd, accepted, pool_units, rows, subs, keys, order, out, stats, tok, n_tok) -> None:
    def payload(offset, length):
        return json.loads(os.pread(fd, length, offset))

    pool = [payload(o, n) for _, o, n in pool_units]
    tasks = template_pool.POOLS[entry.reader]
    for j, (rank, offset, length) in enumerate(accepted):
        unit = int(order[rank])
        r = template_pool.render(payload(offset, length), tasks, Draws(int(keys[unit]) ^ 0x5DEECE66D), pool,
                                 fewshot=entry.fewshot, with_options=entry.with_options,
                                 max_shots=entry.max_shots, max_chars=entry.fewshot_max_chars)
        record = _record(entry, READERS[entry.reader], int(rows[unit]), int(subs[unit]), r.conversations)
        out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        stats.add(r.conversations, r.task, r.template_type, r.shots)
        if tok is not None and j < n_tok:
            stats.tokens.append(len(templates.encode(r.conversations, tok).ids))


def _record(entry, reader, row: int, sub: int, conv: list[dict]) -> dict:
    """The released layout; checked as ``train`` reads it (roles alternate from human and end on an
    answer, no empty turn): a failure here is a bug, never bad input, as the readers check rows."""
    rid = f"{entry.name}/{row}/{sub}" if reader.expands else f"{entry.name}/{row}"
    roles = [t["from"] for t in conv if t["from"] != "system"]
    if (roles[::2] != ["human"] * len(roles[::2]) or roles[1::2] != ["gpt"] * len(roles[1::2]) or roles[-1] != "gpt"
            or any(not isinstance(t["value"], str) or not t["value"].strip() for t in conv)):
        raise AssertionError(f"built record {rid} would not train: {conv!r:.300}")
    return {"id": rid, "source": entry.name, "conversations": conv}
