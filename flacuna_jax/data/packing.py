"""Packing tokenized examples into fixed-length rows (or one example per padded row).

Row contract (every array has shape ``[seq_len]``; batching stacks them):

- ``input_ids`` int32: the tokens, 0 in padding
- ``targets`` int32: the next token *within the same segment* (``input_ids`` shifted left);
  0 at each segment's last token and in padding
- ``loss_mask`` float32: 1.0 where ``targets`` is trained (an assistant answer token or its EOS)
- ``segment_ids`` int32: 1, 2, 3 ... per example in the row, 0 in padding
- ``positions`` int32: 0-based position inside its segment, 0 in padding

Packing is first-fit over ``num_bins`` open rows: an example goes into the first open row it
fits in; a row that is exactly full is emitted at once, and when an example fits no row
and all bins are open, the fullest row is emitted. Examples are
never split, so no token is lost or duplicated. The iterator reads its parent ``MapDataset``
by index, so its state is tiny and JSON-friendly: the next index, the parent indices held in
the open rows (re-read on restore) and running counters.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

COUNTERS = ("examples", "tokens", "trained_tokens", "truncated", "dropped_overlong",
            "dropped_no_target", "skipped_leading_turns", "rows", "row_slots")


def build_row(examples: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """One row from examples with ``ids`` and ``trained`` (per-token 0/1) arrays."""
    input_ids = np.zeros(seq_len, np.int32)
    targets = np.zeros(seq_len, np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    start = 0
    for seg, ex in enumerate(examples, start=1):
        ids, trained = ex["ids"], ex["trained"]
        n = len(ids)
        end = start + n
        if end > seq_len:
            raise ValueError(f"examples of {end} tokens do not fit seq_len={seq_len}")
        input_ids[start:end] = ids
        targets[start:end - 1] = ids[1:]
        loss_mask[start:end - 1] = trained[1:]
        segment_ids[start:end] = seg
        positions[start:end] = np.arange(n, dtype=np.int32)
        start = end
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions}


class PackIterDataset(grain.IterDataset):
    """Rows from a ``MapDataset`` of encoded examples (see ``pipeline.Encoder``).

    Elements of the parent are dicts with ``ids``/``trained`` arrays, a ``drop`` reason
    (None to keep), ``truncated`` and ``skipped_leading``. ``packing=False`` gives one
    example per row (the original Vicuna/Flacuna behaviour).
    """

    def __init__(self, parent: grain.MapDataset, seq_len: int, packing: bool = True,
                 num_bins: int = 8):
        super().__init__(parent)
        self.seq_len, self.packing, self.num_bins = seq_len, packing, max(1, num_bins)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Lets ``mp_prefetch`` give each worker process a slice of the examples."""
        del sequential_slice
        self._parents = (self._parent.slice(sl),)

    def __iter__(self):
        return PackIterator(self._parent, self.seq_len, self.packing, self.num_bins)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, packing={self.packing}, num_bins={self.num_bins})"


class PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.MapDataset, seq_len: int, packing: bool, num_bins: int):
        super().__init__()
        self._source, self._seq_len = parent, seq_len
        self._num_bins = num_bins if packing else 1
        self._packing = packing
        self._next = 0
        self._bins: list[tuple[list[int], list[dict], int]] = []  # (indices, examples, fill)
        self.counts = dict.fromkeys(COUNTERS, 0)

    def _emit(self, b: int) -> dict[str, np.ndarray]:
        _, examples, fill = self._bins.pop(b)
        self.counts["rows"] += 1
        self.counts["row_slots"] += self._seq_len
        return build_row(examples, self._seq_len)

    def _count(self, ex: dict) -> bool:
        c = self.counts
        c["skipped_leading_turns"] += ex["skipped_leading"]
        c["truncated"] += ex["truncated"]
        if ex["drop"] is not None:
            c["dropped_" + ex["drop"]] += 1
            return False
        c["examples"] += 1
        c["tokens"] += len(ex["ids"])
        c["trained_tokens"] += int(ex["trained"][1:].sum())
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        n = len(self._source)
        while self._next < n:
            k = self._next
            ex = self._source[k]
            self._next += 1
            if not self._count(ex):
                continue
            size = len(ex["ids"])
            placed = False
            for b, (indices, examples, fill) in enumerate(self._bins if self._packing else ()):
                if fill + size <= self._seq_len:
                    self._bins[b] = (indices + [k], examples + [ex], fill + size)
                    if fill + size == self._seq_len:  # a full row leaves at once
                        return self._emit(b)
                    placed = True
                    break
            if not placed:
                row = None
                if len(self._bins) >= self._num_bins:
                    fullest = max(range(len(self._bins)), key=lambda i: (self._bins[i][2], -i))
                    row = self._emit(fullest)
                self._bins.append(([k], [ex], size))
                if row is not None:
                    return row
        if self._bins:
            return self._emit(0)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "bins": [list(b[0]) for b in self._bins],
                "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next = int(state["next"])
        self.counts = {**dict.fromkeys(COUNTERS, 0), **copy.deepcopy(state["counts"])}
        self._bins = []
        for indices in state["bins"]:
            examples = [self._source[int(k)] for k in indices]
            self._bins.append(([int(k) for k in indices], examples,
                               sum(len(e["ids"]) for e in examples)))

    def __str__(self) -> str:
        return f"PackIterator(next={self._next}, open_rows={len(self._bins)})"
