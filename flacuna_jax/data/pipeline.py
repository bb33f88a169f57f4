"""Grain input pipeline: FLAN-Mini records -> template + loss mask -> packed global batches.

Batch contract: each element is a dict of numpy arrays of shape ``[batch_size, seq_len]``
(``batch_size`` is the GLOBAL batch; a host builds only its own rows, see ``batches.py``):

- ``input_ids`` int32; ``targets`` int32 = ``input_ids`` shifted left within the segment
  (0 at a segment's last token and in padding); ``loss_mask`` float32, 1.0 where ``targets``
  is an assistant-answer token or its EOS; ``segment_ids`` int32 (1, 2, ... per packed
  example, 0 = padding); ``positions`` int32 (position inside the segment, 0 in padding).
- With ``packing=False`` each row holds one example (segment id 1) and padding.

Stages (all deterministic given the arguments, none depends on the number of hosts)::

    record stores (sources.py) -> train/eval split (seeded, per source)
    -> epoch order: weighted mix + seeded global shuffle, a fresh permutation per epoch
    -> Encoder (template ids + mask, truncate/drop overlong)          -- grain MapDataset
    -> example table: lengths and drop reasons, one pass, shared by the hosts (batches.py)
    -> BatchIterator: first-fit plan on lengths, this host's rows encoded and built

Mixing: source ``i`` with weight ``w_i`` makes up ``w_i / sum(w)`` of each epoch, and an
epoch has as many examples as all train records together (a source is subsampled or
repeated to reach its share). With one source the weight has no effect.

Resuming: ``it = pipeline.iterator(); state = it.get_state()`` gives a JSON-serialisable
dict; ``pipeline.iterator().set_state(state)`` continues exactly where ``it`` was, whatever
the number of hosts and devices of either run. ``num_workers`` only speeds up the table pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import grain
import numpy as np

from flacuna_jax import templates
from flacuna_jax.data.batches import BatchIterator, build_table, split_summary
from flacuna_jax.data.packing import COUNTERS
from flacuna_jax.data.records import DataError
from flacuna_jax.data.sources import RecordStore, open_source, parse_sources

OVERLONG = ("truncate", "drop")
FOREVER_EPOCHS = 1 << 20


def split_indices(n: int, eval_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) local indices, sorted; the eval set is ``round(n * eval_fraction)``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    perm = np.random.default_rng(split_seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _shares(weights: Sequence[float], total: int) -> np.ndarray:
    """Largest-remainder integer split of ``total`` proportional to ``weights``."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


class EpochOrder:
    """Sequence of global record ids over all epochs: mixed and shuffled per epoch."""

    def __init__(self, ids: list[np.ndarray], weights: Sequence[float], seed: int,
                 shuffle: bool, epochs: int):
        self.ids, self.seed, self.shuffle, self.epochs = ids, seed, shuffle, epochs
        self.epoch_len = int(sum(len(x) for x in ids))
        usable = [w if len(x) else 0.0 for x, w in zip(ids, weights)]
        if self.epoch_len == 0 or sum(usable) <= 0:
            raise DataError("no records to iterate (empty split or all weights on empty sources)")
        self.counts = _shares(usable, self.epoch_len)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.epochs * self.epoch_len

    def order(self, epoch: int) -> np.ndarray:
        """The ids of one epoch (cached: the last two epochs)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = self._make_order(epoch)
        return self._cache[epoch]

    def _make_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for ids, count in zip(self.ids, self.counts):
            if count:
                parts.append(np.resize(ids[rng.permutation(len(ids))] if self.shuffle else ids, count))
        order = np.concatenate(parts)
        return order[rng.permutation(len(order))] if self.shuffle else order

    def __getitem__(self, k: int) -> int:
        epoch, j = divmod(int(k), self.epoch_len)
        if not 0 <= epoch < self.epochs:
            raise IndexError(k)
        return int(self.order(epoch)[j])

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}


class Records:
    """Global record id -> record, over several stores."""

    def __init__(self, stores: Sequence[RecordStore]):
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(s) for s in self.stores])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, gid: int) -> dict:
        i = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return self.stores[i][int(gid - self.offsets[i])]


class Encoder:
    """Global record id -> encoded example dict (picklable; runs in worker processes)."""

    def __init__(self, records: Records, tokenizer: Any, seq_len: int, overlong: str,
                 system: str | None = None):
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.records, self.tok = records, templates.SegmentTokenizer.load(tokenizer)
        self.seq_len, self.overlong, self.system = seq_len, overlong, system

    def encode_record(self, rec: dict) -> dict:
        enc = templates.encode(rec["conversations"], self.tok, self.system)
        ids, trained = np.asarray(enc.ids, np.int32), np.asarray(enc.mask, np.int8)
        drop, truncated = None, 0
        if len(ids) > self.seq_len:
            if self.overlong == "drop":
                drop = "overlong"
            else:
                ids, trained, truncated = ids[: self.seq_len], trained[: self.seq_len], 1
        if drop is None and not trained[1:].any():
            drop = "no_target"
        return {"id": rec["id"], "ids": ids, "trained": trained, "drop": drop,
                "truncated": truncated, "skipped_leading": enc.skipped_leading}

    def __call__(self, gid: int) -> dict:
        return self.encode_record(self.records[gid])


class EmptySplit(DataError):
    """The split has no records at all (e.g. ``eval_fraction`` rounds to 0 held-out records)."""


@dataclasses.dataclass
class Pipeline:
    """A built pipeline for one split: the global stream, its example table and batch iterators."""
    order: EpochOrder
    encoder: Encoder
    examples: grain.MapDataset  # stream position -> encoded example
    gids: np.ndarray  # the split's records (global ids)
    report: dict[str, Any]  # sources, record counts, bad records skipped
    seq_len: int
    batch_size: int
    packing: bool = True
    num_bins: int = 8
    drop_remainder: bool = True
    table_options: dict = dataclasses.field(default_factory=dict)  # build_table's process/gather/workers

    @functools.cached_property
    def table(self) -> np.ndarray:
        """[records, 5] example stats by global record id (rows outside the split are unused).

        Raises DataError, in one line with the counts, when the split yields nothing trainable."""
        part = build_table(self.encoder, self.gids, **self.table_options)
        s = split_summary(part)
        self.report.update({f"split_{k}": v for k, v in s.items()})
        if s["kept"] == 0:
            names = ", ".join(src["path"] for src in self.report["sources"])
            raise DataError(
                f"data.sources ({names}): the {self.report['split']} split yields nothing trainable at "
                f"train.seq_len={self.seq_len}: {s['records']} records, 0 kept, {s['dropped_no_target']} "
                f"dropped_no_target (no answer token left), {s['dropped_overlong']} dropped_overlong, "
                f"{s['truncated']} truncated, {self.report['skipped_bad_records']} bad records skipped")
        full = np.zeros((len(self.encoder.records), part.shape[1]), np.int32)
        full[self.gids] = part
        return full

    def iterator(self, rows: Sequence[int] | None = None) -> BatchIterator:
        """A fresh iterator over global batches, building only the row positions `rows` (None: all);
        ``get_state()``/``set_state()`` are JSON-serialisable dicts."""
        table = self.table
        return BatchIterator(self.order, table.__getitem__, self.examples.__getitem__, self.seq_len,
                             self.batch_size, packing=self.packing, num_bins=self.num_bins, rows=rows,
                             drop_remainder=self.drop_remainder)

    def __iter__(self):
        return self.iterator()

    def count_batches(self) -> int:
        """Batches in the whole stream (all epochs), from lengths alone: exact, nothing encoded."""
        it, n = self.iterator(rows=()), 0
        while it.plan_batch() is not None:
            n += 1
        return n


def make_pipeline(sources: Any, tokenizer: Any, *, seq_len: int, batch_size: int, seed: int = 0,
                  split: str = "train", epochs: int | None = 1, packing: bool = True,
                  num_bins: int = 8, shuffle: bool = True, eval_fraction: float = 0.005,
                  split_seed: int = 0, process_index: int = 0, process_count: int = 1,
                  gather: Callable | None = None, num_workers: int = 0, drop_remainder: bool = True,
                  on_bad_record: str = "error", overlong: str = "truncate",
                  cache_dir: str | None = None, allow_hub: bool = False,
                  system: str | None = None) -> Pipeline:
    """Builds the global pipeline of one split. ``epochs=None`` repeats forever. ``batch_size`` is
    the GLOBAL batch; process_index/process_count/gather share the example-table pass over hosts."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    specs = parse_sources(sources)
    stores = [open_source(s.path, cache_dir=cache_dir, on_bad_record=on_bad_record,
                          allow_hub=allow_hub) for s in specs]
    records = Records(stores)
    ids = []
    for store, offset in zip(stores, records.offsets):
        train, held_out = split_indices(len(store), eval_fraction, split_seed)
        ids.append((train if split == "train" else held_out) + offset)
    if not sum(len(x) for x in ids):
        raise EmptySplit(f"data.sources ({', '.join(s.path for s in specs)}): the {split} split has no records "
                         f"({len(records)} records, data.eval_fraction={eval_fraction})")
    order = EpochOrder(ids, [s.weight for s in specs], seed, shuffle,
                       FOREVER_EPOCHS if epochs is None else epochs)
    encoder = Encoder(records, tokenizer, seq_len, overlong, system)
    examples = grain.MapDataset.source(order).map(encoder)
    report = {
        "split": split, "epoch_examples": order.epoch_len,
        "sources": [{"path": s.path, "weight": s.weight, "records": len(st),
                     "skipped_bad_records": st.meta["skipped"], "per_epoch": int(c)}
                    for s, st, c in zip(specs, stores, order.counts)],
        "skipped_bad_records": sum(st.meta["skipped"] for st in stores),
    }
    return Pipeline(order, encoder, examples, np.concatenate(ids), report, seq_len, batch_size, packing,
                    num_bins, drop_remainder, dict(process_index=process_index, process_count=process_count,
                                                   gather=gather, num_workers=num_workers))


def pipeline_from_config(data: Any, tokenizer: Any, *, seq_len: int, batch_size: int,
                         seed: int, split: str = "train", epochs: int | None = 1,
                         process_index: int = 0, process_count: int = 1, gather: Callable | None = None,
                         drop_remainder: bool = True) -> Pipeline:
    """``make_pipeline`` from a ``config.DataConfig`` (eval: no shuffle, one epoch)."""
    is_eval = split == "eval"
    return make_pipeline(
        data.sources, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
        split=split, epochs=1 if is_eval else epochs, packing=data.packing,
        shuffle=data.shuffle and not is_eval, eval_fraction=data.eval_fraction, split_seed=data.split_seed,
        process_index=process_index, process_count=process_count, gather=gather,
        num_workers=data.num_workers, drop_remainder=drop_remainder,
        on_bad_record=data.on_bad_record, overlong=data.overlong, cache_dir=data.cache_dir)


def counts_from_state(state: Any) -> dict[str, int]:
    """Sums the packer counters found anywhere in an iterator state (workers included)."""
    total = dict.fromkeys(COUNTERS, 0)

    def visit(x):
        if isinstance(x, dict):
            c = x.get("counts")
            if isinstance(c, dict) and set(COUNTERS) <= set(c):
                for k in COUNTERS:
                    total[k] += int(c[k])
            for v in x.values():
                if v is not c:
                    visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(state)
    return total
