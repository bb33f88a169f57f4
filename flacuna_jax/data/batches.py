"""Global batches: one packing plan for the whole job, each host building only its own rows.

Where rows are packed: nowhere per host. Every host runs the SAME first-fit packer
(``packing.FirstFit``) over the SAME global example stream (the seeded epoch order of
``pipeline.py``), so every host knows every row of every step: the global batch of step ``s`` is
rows ``s*B .. s*B+B-1`` of that stream, a function of the data, the seed and the global batch
size ``B`` only, never of the process or device count.

The packer needs only each example's length and whether it is dropped. Those come from the
**example table**: one pass that encodes every record of the split once (template + mask) and
keeps five integers per record (tokens, trained tokens, drop reason, truncated, skipped leading
turns). With P processes, process h encodes records h, h+P, ... and the parts are all-gathered
(the ``gather`` callback; ``data/`` itself never imports JAX), so the pass costs each host 1/P of
the encoding; ``num_workers`` runs it in that many worker processes.

How each host finds its rows: the training loop passes the positions ``rows`` (within a batch)
that its devices hold under the batch sharding. A host encodes only the examples of those rows
and leaves the others as padding that never leaves the host.

What it costs per host: the table pass (1/P of one encoding of the split, once per run, before the
first step), then per step the packing decision for all B rows (integers only: a few microseconds
per example, the same on every host) and the encoding of the examples in its own B/P rows. Each
example is thus encoded twice in all (once for the table, once by the host that builds its row),
and a host's encoding work per step falls as 1/P, as with per-host shards; the planning of the
other hosts' rows is the only work that does not.

The iterator state is global (the next stream position, the open rows as stream positions, the
counters), identical on every host: a checkpoint holds one state, valid for any topology. The
end of the data is reached by every host at the same step, so the end of an epoch is decided by
all of them together without a message, and an epoch's step count is exact (``count_batches``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import grain
import numpy as np

from flacuna_jax.data.packing import COUNTERS, FirstFit, build_row, empty_row
from flacuna_jax.data.records import DataError

# Example-table columns (int32 per record of the split).
TOKENS, TRAINED, DROP, TRUNCATED, SKIPPED = range(5)
DROP_REASONS = (None, "overlong", "no_target")


def example_stats(ex: dict) -> np.ndarray:
    """The table row of one encoded example."""
    return np.asarray([len(ex["ids"]), int(ex["trained"][1:].sum()), DROP_REASONS.index(ex["drop"]),
                       ex["truncated"], ex["skipped_leading"]], np.int32)


def build_table(encoder: Callable[[int], dict], gids: np.ndarray, *, process_index: int = 0,
                process_count: int = 1, gather: Callable | None = None, num_workers: int = 0) -> np.ndarray:
    """[len(gids), 5] stats of the records `gids`; this process encodes gids[process_index::process_count]."""
    mine = np.asarray(gids[process_index::process_count], np.int64)
    ds = grain.MapDataset.source(mine).map(lambda g: example_stats(encoder(int(g))))
    if num_workers > 0 and len(mine):
        from absl import flags  # grain's workers read absl flags; a plain script never parses them
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        part = np.stack(list(it)) if len(mine) else np.zeros((0, 5), np.int32)
    else:
        part = np.stack([ds[i] for i in range(len(mine))]) if len(mine) else np.zeros((0, 5), np.int32)
    if process_count == 1:
        return part
    if gather is None:
        raise ValueError("process_count > 1 needs a gather callback")
    table = np.zeros((len(gids), 5), np.int32)
    for h, p in enumerate(gather(part)):
        table[h::process_count] = p
    return table


def split_summary(table: np.ndarray) -> dict[str, int]:
    """Per-record counts of a split's table: records, kept, and why the rest is not trained."""
    drop = table[:, DROP]
    return {"records": len(table), "kept": int(np.sum(drop == 0)),
            "dropped_no_target": int(np.sum(drop == 2)), "dropped_overlong": int(np.sum(drop == 1)),
            "truncated": int(np.sum(table[:, TRUNCATED]))}


class BatchIterator(grain.DatasetIterator):
    """Global batches of `batch_size` rows over the stream; builds only the row positions `rows`.

    `order[k]` is the record of stream position k, `stats(gid)` its table row and `encode(k)` its
    encoded example. Rows this host does not build are padding (segment id 0, nothing trained).
    """

    def __init__(self, order: Sequence[int], stats: Callable[[int], np.ndarray], encode: Callable[[int], dict],
                 seq_len: int, batch_size: int, *, packing: bool = True, num_bins: int = 8,
                 rows: Sequence[int] | None = None, drop_remainder: bool = True):
        super().__init__()
        self._order, self._stats, self._encode = order, stats, encode
        self._seq_len, self._batch_size, self._drop_remainder = seq_len, batch_size, drop_remainder
        self._rows = None if rows is None else frozenset(int(r) for r in rows)
        self._packer = FirstFit(seq_len, packing, num_bins)
        self._next = 0
        self.counts = dict.fromkeys(COUNTERS, 0)

    def _count(self, s: np.ndarray) -> bool:
        c = self.counts
        c["skipped_leading_turns"] += int(s[SKIPPED])
        c["truncated"] += int(s[TRUNCATED])
        if s[DROP]:
            c["dropped_" + DROP_REASONS[s[DROP]]] += 1
            return False
        c["examples"] += 1
        c["tokens"] += int(s[TOKENS])
        c["trained_tokens"] += int(s[TRAINED])
        return True

    def _plan_row(self) -> list[int] | None:
        while self._next < len(self._order):
            k = self._next
            self._next += 1
            s = self._stats(self._order[k])
            if self._count(s):
                row = self._packer.add(k, int(s[TOKENS]))
                if row is not None:
                    return row
        return self._packer.flush()

    def plan_batch(self) -> list[list[int]] | None:
        """The next batch's rows as lists of stream positions (nothing encoded); None at the end."""
        plans = []
        while len(plans) < self._batch_size and (row := self._plan_row()) is not None:
            plans.append(row)
        if not plans or (self._drop_remainder and len(plans) < self._batch_size):
            return None
        self.counts["rows"] += len(plans)
        self.counts["row_slots"] += len(plans) * self._seq_len
        return plans

    def __next__(self) -> dict[str, np.ndarray]:
        plans = self.plan_batch()
        if plans is None:
            raise StopIteration
        built = [build_row([self._encode(k) for k in plan], self._seq_len)
                 if self._rows is None or i in self._rows else empty_row(self._seq_len)
                 for i, plan in enumerate(plans)]
        return {key: np.stack([r[key] for r in built]) for key in built[0]}

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "bins": self._packer.get_state(), "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "next" not in state or "bins" not in state:
            raise DataError(f"not a data-iterator state of this loader: {str(state)[:80]}")
        self._next = int(state["next"])
        self.counts = {**dict.fromkeys(COUNTERS, 0), **copy.deepcopy(state["counts"])}
        self._packer.set_state(state["bins"], lambda k: self._stats(self._order[k])[TOKENS])

    def __str__(self) -> str:
        return f"BatchIterator(next={self._next}, open_rows={len(self._packer.bins)})"
