"""The first-fit packer on synthetic lengths: every example in exactly one row, rows <= seq_len, the
first-fit rule, exact resume from its state; and the row builder's contract."""

import collections
import json

import numpy as np
import pytest

from flacuna_jax.data.packing import FirstFit, build_row, count_rows


def synthetic_lengths(n, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    return [int(rng.choice([seq_len, seq_len // 2, rng.integers(2, seq_len + 1)])) for _ in range(n)]


def pack(lengths, seq_len, packing=True, num_bins=8, packer=None, start=0):
    packer = packer or FirstFit(seq_len, packing, num_bins)
    rows = [row for k in range(start, len(lengths)) if (row := packer.add(k, lengths[k])) is not None]
    while (row := packer.flush()) is not None:
        rows.append(row)
    return rows


@pytest.mark.parametrize("packing,num_bins", [(True, 1), (True, 4), (True, 16), (False, 8)])
def test_every_example_in_exactly_one_row(packing, num_bins):
    seq_len = 64
    lengths = synthetic_lengths(300, seq_len)
    rows = pack(lengths, seq_len, packing, num_bins)
    assert collections.Counter(k for row in rows for k in row) == collections.Counter(range(len(lengths)))
    assert all(sum(lengths[k] for k in row) <= seq_len for row in rows)
    assert len(rows) == count_rows(lengths, seq_len, packing, num_bins)
    if not packing:
        assert rows == [[k] for k in range(len(lengths))]
    elif num_bins > 1:
        assert len(rows) < 0.8 * len(lengths)


def test_first_fit_rule():
    p = FirstFit(10, True, 2)
    assert p.add(0, 6) is None and p.add(1, 7) is None  # two open rows: [6], [7]
    assert p.add(2, 3) is None  # fits the first: [6, 3]
    assert p.add(3, 3) == [1, 3]  # [7, 3] is exactly full: it leaves at once
    assert p.add(4, 5) is None  # fits no open row, a bin is free: a new row [5]
    assert p.add(5, 4) is None  # first fit: [6, 3] is too full, [5] takes it: [5, 4]
    assert p.add(6, 8) == [0, 2]  # fits no row, both bins open: the fullest ([6, 3], 9 tokens) leaves
    assert p.flush() == [4, 5] and p.flush() == [6] and p.flush() is None
    with pytest.raises(ValueError, match="does not fit"):
        p.add(5, 11)


def test_resume_every_position():
    seq_len = 48
    lengths = synthetic_lengths(80, seq_len, seed=1)
    full = pack(lengths, seq_len, num_bins=4)
    for k in range(0, len(lengths) + 1, 3):
        p = FirstFit(seq_len, True, 4)
        before = [row for i in range(k) if (row := p.add(i, lengths[i])) is not None]
        state = json.loads(json.dumps(p.get_state()))
        resumed = FirstFit(seq_len, True, 4)
        resumed.set_state(state, lambda i: lengths[i])
        assert before + pack(lengths, seq_len, packer=resumed, start=k) == full


def test_build_row_contract():
    a = {"ids": np.array([1, 5, 6, 2], np.int32), "trained": np.array([0, 0, 1, 1], np.int8)}
    b = {"ids": np.array([1, 7, 2], np.int32), "trained": np.array([0, 1, 1], np.int8)}
    r = build_row([a, b], 9)
    np.testing.assert_array_equal(r["input_ids"], [1, 5, 6, 2, 1, 7, 2, 0, 0])
    np.testing.assert_array_equal(r["targets"], [5, 6, 2, 0, 7, 2, 0, 0, 0])
    np.testing.assert_array_equal(r["loss_mask"], [0, 1, 1, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 3, 0, 1, 2, 0, 0])
    assert r["loss_mask"].dtype == np.float32 and r["targets"].dtype == np.int32
    with pytest.raises(ValueError, match="do not fit"):
        build_row([a, b], 6)
