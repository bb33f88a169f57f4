"""Packer on synthetic examples: no token lost or duplicated, rows <= seq_len, exact resume."""

import collections
import json

import grain
import numpy as np
import pytest

from flacuna_jax.data.packing import PackIterDataset, build_row


def synthetic(n, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.choice([seq_len, seq_len // 2, rng.integers(2, seq_len + 1)]))
        ids = (np.arange(size, dtype=np.int32) + 1000 * i) % 50000 + 3
        trained = (rng.random(size) < 0.5).astype(np.int8)
        drop = "no_target" if i % 17 == 5 else None
        out.append({"id": str(i), "ids": ids, "trained": trained, "drop": drop,
                    "truncated": 0, "skipped_leading": 0})
    return out


def rows_to_segments(rows):
    segs = []
    for r in rows:
        for s in range(1, r["segment_ids"].max() + 1):
            segs.append(tuple(r["input_ids"][r["segment_ids"] == s]))
    return segs


@pytest.mark.parametrize("packing,num_bins", [(True, 1), (True, 4), (True, 16), (False, 8)])
def test_no_token_lost_or_duplicated(packing, num_bins):
    seq_len = 64
    ex = synthetic(300, seq_len)
    rows = list(PackIterDataset(grain.MapDataset.source(ex), seq_len, packing, num_bins))
    assert all(r["input_ids"].shape == (seq_len,) for r in rows)
    want = [tuple(e["ids"]) for e in ex if e["drop"] is None]
    assert collections.Counter(rows_to_segments(rows)) == collections.Counter(want)
    if not packing:
        assert len(rows) == len(want)


def test_resume_every_position():
    seq_len = 48
    ds = PackIterDataset(grain.MapDataset.source(synthetic(80, seq_len, seed=1)), seq_len, True, 4)
    full = list(ds)
    for k in range(0, len(full) + 1, 3):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        it2 = iter(ds)
        it2.set_state(state)
        rest = list(it2)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


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
