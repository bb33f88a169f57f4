"""Grain pipeline: batch contract, packing loses nothing, exact resume, host sharding, mixing."""

import collections
import json

import numpy as np
import pytest

from flacuna_jax.data import counts_from_state, make_pipeline, split_indices
from tests.conftest_data import demo_dir, sample_path, sample_records, tokenizer_dir, write_jsonl  # noqa: F401

SEQ = 192


@pytest.fixture(scope="module")
def small(tmp_path_factory, sample_records):
    d = tmp_path_factory.mktemp("small")
    return {"path": write_jsonl(d / "small.jsonl", sample_records[:300]),
            "other": write_jsonl(d / "other.jsonl", sample_records[300:360]),
            "cache": str(d / "cache")}


def build(small, tokenizer_dir, **kw):
    args = dict(seq_len=SEQ, batch_size=4, seed=3, cache_dir=small["cache"])
    args.update(kw)
    return make_pipeline(args.pop("sources", small["path"]), tokenizer_dir, **args)


def segments(batches):
    """Token tuples of every packed segment, checking the row contract on the way."""
    out = []
    for b in batches:
        assert b["input_ids"].dtype == np.int32 and b["targets"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32
        for key in b:
            assert b[key].shape[1] == SEQ
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            ids, tgt, lm, pos = (b[k][r] for k in ("input_ids", "targets", "loss_mask", "positions"))
            pad = seg == 0
            assert not ids[pad].any() and not tgt[pad].any() and not lm[pad].any() and not pos[pad].any()
            n_seg = seg.max()
            assert (np.unique(seg[~pad]) == np.arange(1, n_seg + 1)).all()
            for s in range(1, n_seg + 1):
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()
                assert (pos[where] == np.arange(len(where))).all()
                assert (tgt[where[:-1]] == ids[where[1:]]).all() and tgt[where[-1]] == 0
                assert lm[where[-1]] == 0
                out.append(tuple(ids[where]))
    return out


def expected_examples(pipe):
    ex = [pipe.examples[i] for i in range(len(pipe.examples))]
    return [tuple(e["ids"]) for e in ex if e["drop"] is None], ex


@pytest.mark.parametrize("packing", [True, False])
def test_epoch_loses_and_duplicates_nothing(small, tokenizer_dir, packing):
    pipe = build(small, tokenizer_dir, packing=packing, drop_remainder=False, seq_len=SEQ)
    batches = list(pipe.iterator())
    got = segments(batches)
    want, _ = expected_examples(pipe)
    assert collections.Counter(got) == collections.Counter(want)
    assert len(want) == len(pipe.examples) > 0
    rows = sum(b["input_ids"].shape[0] for b in batches)
    if packing:
        assert rows < len(want) / 2
    else:  # one example per row, segment id 1
        assert rows == len(want) and all(b["segment_ids"].max(axis=1).max() == 1 for b in batches)


def test_loss_mask_is_next_token_trained(small, tokenizer_dir):
    pipe = build(small, tokenizer_dir, packing=True, drop_remainder=False)
    _, ex = expected_examples(pipe)
    by_ids = {tuple(e["ids"]): e["trained"] for e in ex}
    for b in pipe.iterator():
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                trained = by_ids[tuple(b["input_ids"][r][where])]
                np.testing.assert_array_equal(b["loss_mask"][r][where[:-1]], trained[1:])


def test_packing_efficiency_and_counts(small, tokenizer_dir):
    pipe = build(small, tokenizer_dir, drop_remainder=False)
    it = pipe.iterator()
    rows = sum(b["input_ids"].shape[0] for b in it)
    c = counts_from_state(it.get_state())
    assert c["rows"] == rows and c["examples"] == len(pipe.examples)
    assert c["tokens"] / c["row_slots"] > 0.85  # packed; padding mode would be far lower


def test_overlong_truncate_and_drop(small, tokenizer_dir):
    lens = [len(e["ids"]) for e in expected_examples(build(small, tokenizer_dir, seq_len=4096))[1]]
    seq = int(np.percentile(lens, 80))
    n_long = sum(n > seq for n in lens)
    assert n_long > 0
    trunc = build(small, tokenizer_dir, seq_len=seq, drop_remainder=False)
    it = trunc.iterator()
    assert all(b["input_ids"].shape[1] == seq for b in it)
    c = counts_from_state(it.get_state())
    assert c["truncated"] == n_long and c["examples"] == len(lens)
    drop = build(small, tokenizer_dir, seq_len=seq, overlong="drop", drop_remainder=False)
    it = drop.iterator()
    list(it)
    c = counts_from_state(it.get_state())
    assert c["dropped_overlong"] == n_long and c["examples"] == len(lens) - n_long


@pytest.mark.parametrize("k", [0, 3, 17])
def test_resume_exact(small, tokenizer_dir, k):
    kw = dict(epochs=2, drop_remainder=True)
    full = [b for b in build(small, tokenizer_dir, **kw).iterator()]
    assert len(full) > 20  # crosses the epoch boundary
    it = build(small, tokenizer_dir, **kw).iterator()
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = build(small, tokenizer_dir, **kw).iterator()
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_two_hosts_disjoint_union_is_epoch(small, tokenizer_dir):
    one = build(small, tokenizer_dir)
    epoch_ids = [one.examples[i]["id"] for i in range(len(one.examples))]
    hosts = [build(small, tokenizer_dir, process_index=h, process_count=2) for h in (0, 1)]
    ids = [[p.examples[i]["id"] for i in range(len(p.examples))] for p in hosts]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(epoch_ids) and len(set(epoch_ids)) == len(epoch_ids)
    for p in hosts:  # each host's batches hold exactly its share
        got = segments(list(build(small, tokenizer_dir, process_index=hosts.index(p),
                                  process_count=2, drop_remainder=False).iterator()))
        assert collections.Counter(got) == collections.Counter(expected_examples(p)[0])


def test_shuffle_is_seeded_and_changes_per_epoch(small, tokenizer_dir):
    a = build(small, tokenizer_dir, epochs=2)
    b = build(small, tokenizer_dir, epochs=2)
    c = build(small, tokenizer_dir, epochs=2, seed=4)
    n = a.report["epoch_examples"]
    ids = lambda p, lo, hi: [p.examples[i]["id"] for i in range(lo, hi)]  # noqa: E731
    assert ids(a, 0, n) == ids(b, 0, n) != ids(c, 0, n)
    assert ids(a, 0, n) != ids(a, n, 2 * n) and sorted(ids(a, 0, n)) == sorted(ids(a, n, 2 * n))
    plain = build(small, tokenizer_dir, shuffle=False)
    assert ids(plain, 0, 5) == sorted(ids(plain, 0, 5))


def test_split_deterministic_and_disjoint(small, tokenizer_dir):
    tr, ev = split_indices(1000, 0.005, 0)
    assert len(ev) == 5 and not set(tr) & set(ev) and len(tr) + len(ev) == 1000
    assert (split_indices(1000, 0.005, 0)[1] == ev).all()
    train = build(small, tokenizer_dir, eval_fraction=0.1)
    ev_pipe = build(small, tokenizer_dir, eval_fraction=0.1, split="eval", shuffle=False)
    t_ids = {train.examples[i]["id"] for i in range(len(train.examples))}
    e_ids = {ev_pipe.examples[i]["id"] for i in range(len(ev_pipe.examples))}
    assert len(e_ids) == 30 and len(t_ids) == 270 and not t_ids & e_ids


def test_weighted_mixing(small, tokenizer_dir):
    pipe = build(small, tokenizer_dir, eval_fraction=0.0,
                 sources=[{"path": small["path"], "weight": 1}, {"path": small["other"], "weight": 1}])
    per = {s["path"]: s["per_epoch"] for s in pipe.report["sources"]}
    assert per == {small["path"]: 180, small["other"]: 180}  # 360 examples, half each
    ids = collections.Counter(pipe.examples[i]["id"] for i in range(len(pipe.examples)))
    other_ids = {f"demo_{i:05d}" for i in range(300, 360)}
    assert sum(ids[i] for i in other_ids) == 180 and all(ids[i] == 3 for i in other_ids)


def test_workers_resume(small, tokenizer_dir):
    kw = dict(num_workers=2)
    full = list(build(small, tokenizer_dir, **kw).iterator())
    it = build(small, tokenizer_dir, **kw).iterator()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = build(small, tokenizer_dir, **kw).iterator()
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
