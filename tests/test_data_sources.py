"""Sources: every format gives the same records; bad input gives one clear error or a count."""

import json
import os
import zipfile

import pytest

from flacuna_jax.data import DataError, make_pipeline, open_source, parse_sources
from tests.conftest_data import demo_dir, sample_path, sample_records, tokenizer_dir, write_jsonl  # noqa: F401

GOOD = [{"id": f"r{i}", "source": "t", "conversations": [
    {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(6)]


def records(store):
    return [store[i] for i in range(len(store))]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_formats_agree(tmp_path, cache):
    as_json = tmp_path / "flan_mini.json"
    as_json.write_text(json.dumps(GOOD, indent=2))
    zpath = tmp_path / "flan_mini.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(as_json, "flan_mini.json")
    jsonl = write_jsonl(tmp_path / "x.jsonl", GOOD)
    import pyarrow as pa
    import pyarrow.parquet as pq
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    pq.write_table(pa.Table.from_pylist(GOOD[:3]), chunks / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(GOOD[3:]), chunks / "part-1.parquet")
    import datasets
    disk = tmp_path / "disk"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(disk))
    want = records(open_source(str(as_json), cache_dir=cache))
    assert [r["id"] for r in want] == [r["id"] for r in GOOD]
    for p in (zpath, jsonl, chunks, str(chunks / "*.parquet"), disk):
        assert records(open_source(str(p), cache_dir=cache)) == want, p


def test_cache_keyed_by_content(tmp_path, cache):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(GOOD))
    s1 = open_source(str(p), cache_dir=cache)
    assert open_source(str(p), cache_dir=cache).directory == s1.directory
    p.write_text(json.dumps(GOOD[:2]))
    s2 = open_source(str(p), cache_dir=cache)
    assert s2.directory != s1.directory and len(s2) == 2


def test_hub_source_keyed_by_revision_and_fingerprint(cache, monkeypatch):
    """A hub dataset that changes under the same id (a new revision pushed) is converted again;
    an explicit @revision reaches datasets and keys its own store. The hub is a local stand-in."""
    import datasets

    hub = {None: GOOD, "v1": GOOD[:2]}
    asked = []

    def load_dataset(path, split, revision=None):
        asked.append((path, revision))
        return datasets.Dataset.from_list(hub[revision])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    latest = open_source("hf://org/flan", cache_dir=cache)
    assert records(latest) == GOOD
    hub[None] = GOOD[3:]  # the hub's main branch moves on
    moved = open_source("hf://org/flan", cache_dir=cache)
    assert moved.directory != latest.directory and records(moved) == GOOD[3:]
    pinned = open_source("hf://org/flan@v1", cache_dir=cache)
    assert len(pinned) == 2 and asked[-1] == ("org/flan", "v1")


def test_failed_or_losing_conversion_leaves_no_temporary_copy(tmp_path, cache):
    from flacuna_jax.data import sources
    from flacuna_jax.data.records import BadRecordLog

    _err(tmp_path, cache, "bad.json", json.dumps(GOOD).replace('"a3"', '"a3" oops', 1))
    assert os.listdir(cache) == []
    # Two processes that both found no store: the loser of the rename drops its copy, keeps the winner's.
    good = tmp_path / "good.jsonl"
    write_jsonl(good, GOOD)
    store = open_source(str(good), cache_dir=cache)
    sources._convert(sources._read_json_file(str(good)), store.directory, str(good), BadRecordLog("error"))
    assert os.listdir(cache) == [os.path.basename(store.directory)] and records(store) == GOOD


def _err(tmp_path, cache, name, content, policy="error"):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        open_source(str(p), cache_dir=cache, on_bad_record=policy)
    return str(e.value), str(p)


def test_malformed_json_array_names_line(tmp_path, cache):
    text = json.dumps(GOOD, indent=1).replace('"a3"', '"a3" oops', 1)
    msg, path = _err(tmp_path, cache, "bad.json", text)
    line = text[: text.index("oops")].count("\n") + 1
    assert msg.startswith(f"{path}:{line}:") and "malformed JSON" in msg


def test_malformed_jsonl_line(tmp_path, cache):
    lines = [json.dumps(r) for r in GOOD]
    lines[2] = lines[2][:-3]
    msg, path = _err(tmp_path, cache, "bad.jsonl", "\n".join(lines) + "\n")
    assert msg.startswith(f"{path}:3:") and "malformed JSON" in msg and "on_bad_record=skip" in msg


@pytest.mark.parametrize("bad,expected", [
    ({"id": "x"}, "(id='x'): record has no 'conversations'"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
    ({"id": "x", "conversations": [{"from": "human", "value": 5}]}, "'value' is int"),
    ({"id": "x", "conversations": "hi"}, "'conversations' is a str"),
    ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "roles must alternate"),
    ([1, 2], "record is a list"),
])
def test_bad_record_error_names_file_and_record(tmp_path, cache, bad, expected):
    msg, path = _err(tmp_path, cache, "recs.json", json.dumps(GOOD[:2] + [bad] + GOOD[2:]))
    assert msg.startswith(f"{path}: record 2 (line 1)") and expected in msg


def test_bad_records_skipped_and_counted(tmp_path, cache, tokenizer_dir):
    bad = [{"id": "x"}, {"id": "y", "conversations": [{"from": "bot", "value": "?"}]}]
    p = write_jsonl(tmp_path / "mixed.jsonl", GOOD[:3] + bad + GOOD[3:])
    with open(p, "ab") as f:
        f.write(b'{"id": "z", "conversations": [{"from": "human", "value": "\xff"}]}\n')
        f.write(b"{not json}\n")
    store = open_source(p, cache_dir=cache, on_bad_record="skip")
    assert len(store) == 6 and store.meta["skipped"] == 4
    assert any(":4" in m and "no 'conversations'" in m for m in store.meta["skip_examples"])
    assert any(":9" in m and "invalid UTF-8" in m for m in store.meta["skip_examples"])
    with pytest.raises(DataError, match="4 bad records"):  # same cache, strict policy
        open_source(p, cache_dir=cache, on_bad_record="error")
    pipe = make_pipeline(p, tokenizer_dir, seq_len=64, batch_size=1, cache_dir=cache,
                         on_bad_record="skip", eval_fraction=0)
    assert pipe.report["skipped_bad_records"] == 4


def test_invalid_utf8_json_array(tmp_path, cache):
    data = json.dumps(GOOD, indent=1).encode().replace(b"q4", b"q\xc3\x28", 1)
    msg, path = _err(tmp_path, cache, "latin.json", data)
    line = data[: data.index(b"\xc3")].count(b"\n") + 1
    assert msg.startswith(f"{path}:{line}:") and "invalid UTF-8" in msg


@pytest.mark.parametrize("content", ["", "  \n", "[]"])
def test_empty_file(tmp_path, cache, content):
    msg, path = _err(tmp_path, cache, "empty.json", content)
    assert path in msg and ("empty file" in msg or "no records" in msg)


def test_missing_path_and_weights(tmp_path, cache):
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(str(tmp_path / "nope.json"), cache_dir=cache)
    with pytest.raises(DataError, match="weights sum to 0"):
        parse_sources([{"path": "a", "weight": 0}, {"path": "b", "weight": 0.0}])
    with pytest.raises(DataError, match="weight must be finite"):
        parse_sources([{"path": "a", "weight": -1}])
    with pytest.raises(DataError, match="no data sources"):
        parse_sources([])
    with pytest.raises(ValueError, match="on_bad_record"):
        open_source(str(tmp_path / "nope.json"), on_bad_record="ignore")


def test_parse_sources_forms():
    from flacuna_jax.config import DataSource
    specs = parse_sources(["a.json", {"path": "b.json", "weight": 2}, DataSource("c", 0.5)])
    assert [(s.path, s.weight) for s in specs] == [("a.json", 1.0), ("b.json", 2.0), ("c", 0.5)]


def test_store_is_picklable_across_processes(tmp_path, cache):
    import pickle
    p = write_jsonl(tmp_path / "x.jsonl", GOOD)
    store = open_source(p, cache_dir=cache)
    store[0]
    clone = pickle.loads(pickle.dumps(store))
    assert records(clone) == records(store)
    assert os.path.basename(clone.directory) == os.path.basename(store.directory)
