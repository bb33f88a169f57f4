"""One recipe entry -> its shard: ``count`` records sampled without replacement, in key order.

1. Units: every row is one unit, or (``reader.expands``) one pass over the columns that say how
   many units a row holds (one per solution). Rows that fail there are bad rows.
2. Sampling: units sorted by their seeded key (``sampling.py``); the first ``count`` are read,
   checked and turned into payloads, spilled to disk in read order. A bad row is an error
   naming the source and the row, or (``on_bad_row: skip``) counted, and the next units in key
   order take its place, so the entry still gets exactly ``count`` records when the source has
   enough good ones. Fewer than ``count`` good units: an error naming the entry, unless
   ``allow_fewer`` (the card says it took all there was).
3. Rendering, in key order: instruction payloads as they are; templated ones through the
   template pool, with the source's first ``POOL_SIZE`` units in key order as the exemplar pool
   (read even when ``count`` is smaller, so that a record renders the same at any scale). Each
   record is validated as ``train`` will read it and written as one JSON line.

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
from flacuna_jax.data.records import DataError, validate_record

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
    chars: list[int]  # characters per record (all turns), in shard order
    tokens: list[int] | None  # template tokens per record (with a tokenizer)
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
    for i, row in src.rows(columns=list(reader.count_columns)):
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
                tokenizer: str | None = None) -> ShardResult:
    t0 = time.time()
    reader = READERS[entry.reader]
    src = RowSource(entry, cache_dir)
    bad, bad_rows = BadRows(entry), set()
    rows, subs = _unit_index(entry, src, bad, bad_rows)
    seed64 = stream_seed(seed, entry.name)
    keys = unit_keys(seed64, rows, subs if reader.expands else None)
    order = key_order(keys)
    spill_path = os.path.join(workdir, f"{entry.name}.payloads.jsonl")
    accepted: list[tuple[int, int, int]] = []  # (rank, offset, length) in the spill
    # A templated source reads at least its exemplar pool, so the pool (and every record's
    # rendering) does not depend on the count: a smaller --scale gives a subset of the records.
    wanted_units = max(entry.count, POOL_SIZE) if reader.templated else entry.count
    pos = 0
    with open(spill_path, "wb") as spill:
        while len(accepted) < wanted_units and pos < len(order):
            ranks = np.arange(pos, min(len(order), pos + wanted_units - len(accepted)))
            pos = int(ranks[-1]) + 1
            units = order[ranks]
            if bad_rows:  # units of rows already found bad are not read again
                keep = ~np.isin(rows[units], np.fromiter(bad_rows, np.int64))
                ranks, units = ranks[keep], units[keep]
            by_row = np.lexsort((subs[units], rows[units]))
            ranks, units = ranks[by_row], units[by_row]
            wanted = np.unique(rows[units])
            k = 0
            for i, row in src.rows(wanted):
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
                    line = json.dumps(payload, ensure_ascii=False).encode() + b"\n"
                    accepted.append((rank, spill.tell(), len(line)))
                    spill.write(line)
    accepted.sort()
    pool_units, accepted = accepted[:POOL_SIZE], accepted[:entry.count]
    took_all = len(accepted) < entry.count
    if took_all and not entry.allow_fewer:
        raise DataError(f"source '{entry.name}' ({src.label}): {entry.count} records asked, only "
                        f"{len(accepted)} usable units ({len(rows)} units in {src.num_rows} rows, {bad.count} bad "
                        "rows skipped); set allow_fewer: true in the recipe to take what there is")
    result = _render(entry, reader, accepted, pool_units, spill_path, rows, subs, keys, order, workdir, tokenizer)
    os.remove(spill_path)
    return dataclasses.replace(result, asked=entry.count, units=len(rows), rows=int(src.num_rows or 0),
                               took_all=took_all, skipped_rows=bad.count, skip_examples=bad.examples,
                               seconds=round(time.time() - t0, 2))


def _render(entry, reader, accepted, pool_units, spill_path, rows, subs, keys, order, workdir, tokenizer) -> ShardResult:
    tok = templates.SegmentTokenizer.load(tokenizer) if tokenizer else None
    tasks, kinds, shots = Counter(), Counter(), Counter()
    chars, tokens = [], [] if tok else None
    shard_path = os.path.join(workdir, f"{entry.name}.jsonl")
    fd = os.open(spill_path, os.O_RDONLY)
    try:
        def payload(offset, length):
            return json.loads(os.pread(fd, length, offset))

        pool = [payload(o, n) for _, o, n in pool_units] if reader.templated else []
        tasks_of = template_pool.POOLS.get(reader.name, ())
        with open(shard_path, "w", encoding="utf-8") as out:
            for rank, offset, length in accepted:
                unit = int(order[rank])
                row, sub = int(rows[unit]), int(subs[unit])
                p = payload(offset, length)
                if reader.templated:
                    r = template_pool.render(p, tasks_of, Draws(int(keys[unit]) ^ 0x5DEECE66D), pool,
                                             fewshot=entry.fewshot, with_options=entry.with_options,
                                             max_shots=entry.max_shots, max_chars=entry.fewshot_max_chars)
                    conv, task, kind, n_shots = r.conversations, r.task, r.template_type, r.shots
                else:
                    conv, task, kind = p["conversations"], p["task"], p["template_type"]
                    n_shots = None
                rid = f"{entry.name}/{row}/{sub}" if reader.expands else f"{entry.name}/{row}"
                record = {"id": rid, "source": entry.name, "conversations": conv}
                _check_record(record)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                tasks[task] += 1
                kinds[kind or "as_published"] += 1
                shots["as_published" if n_shots is None else str(n_shots)] += 1
                chars.append(sum(len(t["value"]) for t in conv))
                if tok is not None:
                    tokens.append(len(templates.encode(conv, tok).ids))
    finally:
        os.close(fd)
    return ShardResult(entry.name, shard_path, len(accepted), 0, 0, 0, False, 0, [], dict(sorted(tasks.items())),
                       dict(sorted(kinds.items())), dict(sorted(shots.items())), chars, tokens, 0.0)


def _check_record(record: dict) -> None:
    """What ``train`` will accept, and no empty turn (a bug here, never bad input: readers check)."""
    validate_record(record, f"built record {record['id']}", record["id"])
    for j, turn in enumerate(record["conversations"]):
        if not turn["value"].strip():
            raise AssertionError(f"built record {record['id']}: turn {j} is empty")
