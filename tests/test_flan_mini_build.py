"""``data build``: exact counts, byte-identical rebuilds, sampling without replacement, clear errors."""

import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flacuna_jax.data import open_source
from flacuna_jax.data.cli import main
from flacuna_jax.data.flan_mini import build, load_recipe, parse_recipe
from flacuna_jax.data.flan_mini.mixer import interleave
from flacuna_jax.data.records import DataError
from tests import flan_mini_sources as fx

ROOT = Path(__file__).resolve().parents[1]
SCALE = 1e-4  # Table 1 / 10,000: 134 records
COUNTS = {"flan2021": 39, "t0": 32, "niv2": 20, "cot": 10, "code_search_net": 10, "code_contests": 5, "apps": 5,
          "gpt4_alpaca": 5, "code_alpaca": 2, "sharegpt": 6}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    paths = fx.write_sources(d / "src", 60)
    recipe = d / "recipe.yaml"
    recipe.write_text(fx.local_recipe(str(ROOT / "configs/flan_mini.yaml"), paths))
    return {"dir": d, "paths": paths, "recipe": str(recipe), "cache": str(d / "cache")}


@pytest.fixture(scope="module")
def built(sources):
    out = sources["dir"] / "out"
    stats = build(load_recipe(sources["recipe"]), str(out), scale=SCALE, cache_dir=sources["cache"])
    return out, stats


def records(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_scaled_build_has_exactly_the_recipe_counts(built):
    out, stats = built
    recs = records(out / "flan_mini.json")
    assert Counter(r["source"] for r in recs) == COUNTS and len(recs) == 134 == stats["output"]["records"]
    assert all(set(r) == {"id", "source", "conversations"} and r["id"].startswith(r["source"] + "/") for r in recs)
    assert len({r["id"] for r in recs}) == len(recs)  # without replacement
    for r in recs:
        assert all(t["value"].strip() for t in r["conversations"]) and r["conversations"][-1]["from"] == "gpt"
    assert {k: v["records"] for k, v in stats["sources"].items()} == COUNTS
    assert stats["sources"]["code_contests"]["units_in_source"] == 60 and stats["sources"]["apps"]["rows_in_source"] == 20
    # the interleave is a shuffle, not one source after another
    assert len({r["source"] for r in recs[:20]}) >= 4


def test_data_card_counts_tasks_shots_options_and_recipe(built):
    out, stats = built
    card = (out / "DATA_CARD.md").read_text()
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    s = stats["sources"]
    assert set(s["code_search_net"]["tasks"]) <= {"summarize", "generate", "language_id"}
    assert sum(s["apps"]["tasks"].values()) == 5 and s["sharegpt"]["shots"] == {"as_published": 6}
    assert sum(stats["shots"].values()) == sum(stats["options"].values()) == 134
    assert stats["shots"]["zero_shot"] > 0 and stats["shots"]["few_shot"] > 0
    assert stats["options"]["with_options"] > 0 and stats["options"]["without_options"] > 0
    assert s["flan2021"]["template_types"].keys() <= {"zs_opt", "zs_noopt", "fs_opt", "fs_noopt"}
    assert stats["recipe"]["scale"] == SCALE and stats["recipe"]["seed"] == 0
    assert stats["chars"]["p50"] <= stats["chars"]["p99"] <= stats["chars"]["max"]
    assert "| flan2021 | flan |" in card and "## Recipe" in card and "reader: code_contests" in card
    assert stats["output"]["json_sha256"] in card


def test_same_seed_is_byte_identical_any_workers_other_seed_changes_sample(sources, built, tmp_path):
    out1, _ = built
    out2 = tmp_path / "again"
    build(load_recipe(sources["recipe"]), str(out2), scale=SCALE, cache_dir=sources["cache"], workers=2)
    for name in ("flan_mini.json", "stats.json", "DATA_CARD.md"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    out3 = tmp_path / "seed1"
    build(load_recipe(sources["recipe"]), str(out3), scale=SCALE, cache_dir=sources["cache"], seed=1)
    a, b = records(out1 / "flan_mini.json"), records(out3 / "flan_mini.json")
    assert Counter(r["source"] for r in b) == COUNTS
    assert {r["id"] for r in a} != {r["id"] for r in b}
    assert not [p for p in os.listdir(out1) if p.startswith(".")]  # no temporary directory left


def test_a_smaller_scale_takes_a_subset_of_a_larger_one(sources, built, tmp_path):
    small = records(built[0] / "flan_mini.json")
    build(load_recipe(sources["recipe"]), str(tmp_path), scale=1.5 * SCALE, cache_dir=sources["cache"])
    large = records(tmp_path / "flan_mini.json")
    assert {r["id"] for r in small} < {r["id"] for r in large}
    by_id = {r["id"]: r for r in large}
    assert all(by_id[r["id"]] == r for r in small)  # the same rendering too


def write_recipe(tmp_path, sources, name="gpt4_alpaca", **entry):
    raw = {"seed": 0, "sources": [{"name": name, "path": sources["paths"].get(name, ""), "reader": "alpaca",
                                   "count": 5, **entry}]}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_too_few_rows_is_an_error_naming_the_source_unless_allowed(sources, tmp_path):
    r = write_recipe(tmp_path, sources, count=61)
    with pytest.raises(DataError, match=r"source 'gpt4_alpaca' \(.*alpaca_gpt4_data.json\): 61 records asked, only 60"):
        build(load_recipe(r), str(tmp_path / "o"), cache_dir=sources["cache"])
    # from a worker process too, while another source builds
    raw = yaml.safe_load(Path(r).read_text())
    raw["sources"].append({"name": "sharegpt", "path": sources["paths"]["sharegpt"], "reader": "sharegpt", "count": 5})
    Path(r).write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"source 'gpt4_alpaca' .*: 61 records asked, only 60"):
        build(load_recipe(r), str(tmp_path / "o"), cache_dir=sources["cache"], workers=2)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    r = write_recipe(tmp_path, sources, count=61, allow_fewer=True)
    st = build(load_recipe(r), str(tmp_path / "o"), cache_dir=sources["cache"])
    assert st["sources"]["gpt4_alpaca"]["records"] == 60 and st["sources"]["gpt4_alpaca"]["took_all"]
    assert "took all there was" in (tmp_path / "o" / "DATA_CARD.md").read_text()


def test_bad_row_stops_the_build_naming_file_and_row_or_is_skipped_and_replaced(sources, tmp_path):
    rows = fx.alpaca_rows(8, "x")
    rows[3]["output"] = 42
    del rows[5]["instruction"]
    path = fx.write_json(tmp_path / "alpaca_bad.json", rows)
    raw = {"sources": [{"name": "a", "path": path, "reader": "alpaca", "count": 8}]}
    with pytest.raises(DataError, match=r"alpaca_bad.json: row [35]: (field 'output' is int|missing field 'instruction')") as e:
        build(parse_recipe(raw), str(tmp_path / "o"), cache_dir=sources["cache"])
    assert "\n" not in str(e.value) and "on_bad_row: skip" in str(e.value)
    raw["sources"][0].update(count=6, on_bad_row="skip")
    st = build(parse_recipe(raw), str(tmp_path / "o"), cache_dir=sources["cache"])
    a = st["sources"]["a"]
    assert a["records"] == 6 and a["skipped_bad_rows"] == 2 and len(a["skip_examples"]) == 2
    ids = {r["id"] for r in records(tmp_path / "o" / "flan_mini.json")}
    assert ids == {f"a/{i}" for i in (0, 1, 2, 4, 6, 7)}  # the bad rows' places taken by the next in key order


def test_zip_is_the_released_layout_and_reads_as_the_json(sources, built, tmp_path):
    build(load_recipe(sources["recipe"]), str(tmp_path), scale=SCALE, cache_dir=sources["cache"], zip_output=True)
    z = tmp_path / "flan_mini.json.zip"
    with zipfile.ZipFile(z) as f:
        assert f.namelist() == ["flan_mini.json"]
        assert f.read("flan_mini.json") == (built[0] / "flan_mini.json").read_bytes()
    store = open_source(str(z), cache_dir=str(tmp_path / "c"))
    assert [store[i] for i in range(len(store))] == records(built[0] / "flan_mini.json")


def test_failed_build_keeps_the_earlier_output(sources, tmp_path):
    ok = write_recipe(tmp_path, sources)
    build(load_recipe(ok), str(tmp_path), cache_dir=sources["cache"])
    before = (tmp_path / "flan_mini.json").read_bytes()
    bad = write_recipe(tmp_path, sources, count=1000)
    with pytest.raises(DataError):
        build(load_recipe(bad), str(tmp_path), cache_dir=sources["cache"])
    assert (tmp_path / "flan_mini.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["DATA_CARD.md", "flan_mini.json", "r.yaml", "stats.json"]


def test_cli_build_and_its_errors(sources, built, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", "--recipe", sources["recipe"], "--out", str(out), "--scale", str(SCALE),
                 "--cache-dir", sources["cache"]]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 134
    assert (out / "flan_mini.json").read_bytes() == (built[0] / "flan_mini.json").read_bytes()
    assert main(["build", "--recipe", str(tmp_path / "none.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none.yaml: cannot read the recipe" in err and len(err.strip().splitlines()) == 1
    assert main(["build", "--recipe", sources["recipe"], "--out", str(out), "--tokenizer", str(tmp_path / "no_tok")]) == 2
    assert "tokenizer not found" in capsys.readouterr().err


def test_interleave_is_a_seeded_permutation_of_the_counts():
    a = interleave([3, 0, 5, 2], 0)
    assert Counter(a.tolist()) == {0: 3, 2: 5, 3: 2}
    assert (a == interleave([3, 0, 5, 2], 0)).all() and not (a == interleave([3, 0, 5, 2], 1)).all()


def test_streamed_source_gives_the_same_records(sources, tmp_path):
    rows = fx.alpaca_rows(30, "s")
    path = fx.write_jsonl(tmp_path / "a.jsonl", rows)
    raw = {"sources": [{"name": "a", "path": path, "reader": "alpaca", "count": 12}]}
    build(parse_recipe(raw), str(tmp_path / "mapped"), cache_dir=sources["cache"])
    raw["sources"][0]["streaming"] = True
    build(parse_recipe(raw), str(tmp_path / "streamed"), cache_dir=sources["cache"])
    assert (tmp_path / "mapped" / "flan_mini.json").read_bytes() == (tmp_path / "streamed" / "flan_mini.json").read_bytes()


def test_benchmark_sources_are_in_the_published_schemas(tmp_path):
    """benchmarks/flan_mini_build.py's synthetic sources, tiny, go through every reader."""
    from benchmarks.flan_mini_build import write_sources

    write_sources(tmp_path, 1e-4, 1.25)
    st = build(load_recipe(str(tmp_path / "recipe.yaml")), str(tmp_path / "out"), scale=1e-4,
               cache_dir=str(tmp_path / "cache"))
    assert {k: v["records"] for k, v in st["sources"].items()} == COUNTS
