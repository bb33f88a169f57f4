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


def test_hosts_build_their_rows_of_one_global_plan(small, tokenizer_dir):
    """Two hosts share the example-table pass (each encodes half the records, then all-gather) and
    build disjoint rows of the same global batches: together, exactly one host's batches."""
    from flacuna_jax.data.batches import build_table

    one = build(small, tokenizer_dir)
    halves = {}

    class Captured(Exception):
        pass

    def capture(h):
        def gather(part):
            halves[h] = part
            raise Captured
        return gather

    for h in (0, 1):
        with pytest.raises(Captured):
            build_table(one.encoder, one.gids, process_index=h, process_count=2, gather=capture(h))
    assert len(halves[0]) + len(halves[1]) == len(one.gids) and abs(len(halves[0]) - len(halves[1])) <= 1
    table = build_table(one.encoder, one.gids, process_index=0, process_count=2,
                        gather=lambda part: [halves[0], halves[1]])
    np.testing.assert_array_equal(table, one.table[one.gids])

    full = list(one.iterator())
    mine = [list(one.iterator(rows=rows)) for rows in ([0, 1], [2, 3])]
    assert len(full) == len(mine[0]) == len(mine[1]) > 5
    for f, a, b in zip(full, *mine):
        for key in f:
            np.testing.assert_array_equal(a[key][:2], f[key][:2])
            np.testing.assert_array_equal(b[key][2:], f[key][2:])
            assert not a[key][2:].any() and not b[key][:2].any()  # the other host's rows: padding


def test_nothing_trainable_is_one_line_with_the_counts(tmp_path, small, tokenizer_dir, sample_records):
    from flacuna_jax.data import DataError, EmptySplit

    long = [{"id": f"x{i}", "conversations": [{"from": "human", "value": "word " * 300},
                                              {"from": "gpt", "value": "ok"}]} for i in range(20)]
    path = write_jsonl(tmp_path / "long.jsonl", long)
    pipe = build(small, tokenizer_dir, sources=path, seq_len=64, eval_fraction=0.0)
    with pytest.raises(DataError) as e:
        pipe.iterator()
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "20 records, 0 kept, 20 dropped_no_target" in msg, msg
    with pytest.raises(DataError, match="0 kept, 0 dropped_no_target .no answer token left., 20 dropped_overlong"):
        build(small, tokenizer_dir, sources=path, seq_len=64, overlong="drop", eval_fraction=0.0).count_batches()
    with pytest.raises(EmptySplit, match="the eval split has no records"):
        build(small, tokenizer_dir, sources=path, eval_fraction=0.02, split="eval")


def test_count_batches_is_exact(small, tokenizer_dir):
    for kw in (dict(epochs=1), dict(epochs=2, packing=False)):
        pipe = build(small, tokenizer_dir, **kw)
        assert pipe.count_batches() == sum(1 for _ in pipe.iterator()) > 0


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


def test_workers_only_speed_up_the_table(small, tokenizer_dir):
    serial, workers = build(small, tokenizer_dir), build(small, tokenizer_dir, num_workers=2)
    np.testing.assert_array_equal(workers.table, serial.table)
    for a, b in zip(serial.iterator(), workers.iterator()):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
