"""Packing examples into fixed-length rows: ONE first-fit packer over lengths, and the row builder.

Row contract (every array has shape ``[seq_len]``; batching stacks them):

- ``input_ids`` int32: the tokens, 0 in padding
- ``targets`` int32: the next token *within the same segment* (``input_ids`` shifted left);
  0 at each segment's last token and in padding
- ``loss_mask`` float32: 1.0 where ``targets`` is trained (an assistant answer token or its EOS)
- ``segment_ids`` int32: 1, 2, 3 ... per example in the row, 0 in padding
- ``positions`` int32: 0-based position inside its segment, 0 in padding

:class:`FirstFit` decides rows from example lengths alone: an example goes into the first of
``num_bins`` open rows it fits in; a row that is exactly full leaves at once, and when an example
fits no row and all bins are open, the fullest row leaves. Examples are never split, so no token
is lost or duplicated. ``packing=False`` is one example per row. Because it needs only lengths,
the same packer plans the training rows (``pipeline.py``), counts an epoch's steps exactly and
serves the benchmarks; :func:`build_row` then materialises a planned row from encoded examples.
"""

from __future__ import annotations

import numpy as np

COUNTERS = ("examples", "tokens", "trained_tokens", "truncated", "dropped_overlong",
            "dropped_no_target", "skipped_leading_turns", "rows", "row_slots")


class FirstFit:
    """First-fit over ``num_bins`` open rows of ``seq_len`` tokens; rows are lists of example keys."""

    def __init__(self, seq_len: int, packing: bool = True, num_bins: int = 8):
        self.seq_len = seq_len
        self.num_bins = max(1, num_bins) if packing else 1
        self.packing = packing
        self.bins: list[tuple[list[int], int]] = []  # (keys, fill)

    def add(self, key: int, size: int) -> list[int] | None:
        """Places example ``key`` of ``size`` tokens; returns the row that left, if one did."""
        if size > self.seq_len:
            raise ValueError(f"an example of {size} tokens does not fit seq_len={self.seq_len}")
        for b, (keys, fill) in enumerate(self.bins if self.packing else ()):
            if fill + size <= self.seq_len:
                self.bins[b] = (keys + [key], fill + size)
                return self.bins.pop(b)[0] if fill + size == self.seq_len else None
        row = None
        if len(self.bins) >= self.num_bins:
            row = self.bins.pop(max(range(len(self.bins)), key=lambda i: (self.bins[i][1], -i)))[0]
        self.bins.append(([key], size))
        return row

    def flush(self) -> list[int] | None:
        """The oldest open row (at the end of the data), or None when none is open."""
        return self.bins.pop(0)[0] if self.bins else None

    def get_state(self) -> list[list[int]]:
        return [list(keys) for keys, _ in self.bins]

    def set_state(self, bins: list[list[int]], size_of) -> None:
        self.bins = [([int(k) for k in keys], sum(int(size_of(int(k))) for k in keys)) for keys in bins]


def count_rows(lengths, seq_len: int, packing: bool = True, num_bins: int = 8) -> int:
    """Rows the packer makes from examples of these lengths, in this order."""
    packer, rows = FirstFit(seq_len, packing, num_bins), 0
    for k, n in enumerate(lengths):
        rows += packer.add(k, int(n)) is not None
    return rows + len(packer.bins)


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


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row of padding: nothing trained (a row another host builds, or a short batch's filler)."""
    return build_row([], seq_len)
