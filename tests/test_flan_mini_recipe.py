"""configs/flan_mini.yaml is Table 1; a bad recipe is one error naming the entry and the key."""

from pathlib import Path

import pytest
import yaml

from flacuna_jax.data.flan_mini import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
TABLE_1 = {"flan2021": 388_000, "t0": 320_000, "niv2": 200_000, "cot": 100_000, "code_search_net": 100_000,
           "code_contests": 50_000, "apps": 50_000, "gpt4_alpaca": 52_000, "code_alpaca": 20_000, "sharegpt": 60_000}


def test_shipped_recipe_is_table_1():
    r = load_recipe(str(ROOT / "configs/flan_mini.yaml"))
    assert {e.name: e.count for e in r.entries} == TABLE_1 and r.total == 1_340_000
    readers = {e.name: e.reader for e in r.entries}
    assert [n for n, rd in readers.items() if rd == "flan"] == ["flan2021", "t0", "niv2", "cot"]
    assert readers["gpt4_alpaca"] == readers["code_alpaca"] == "alpaca" and readers["sharegpt"] == "sharegpt"
    assert all(e.path.startswith("hf://") for e in r.entries) and r.seed == 0
    assert "Table 1" in r.description and r.text.startswith("# FLAN-Mini")


def test_scale_rounds_half_up_and_keeps_every_source():
    r = load_recipe(str(ROOT / "configs/flan_mini.yaml"))
    assert {e.name: e.count for e in r.scaled(0.01).entries}["gpt4_alpaca"] == 520
    tiny = {e.name: e.count for e in r.scaled(1e-4).entries}
    assert tiny == {"flan2021": 39, "t0": 32, "niv2": 20, "cot": 10, "code_search_net": 10, "code_contests": 5,
                    "apps": 5, "gpt4_alpaca": 5, "code_alpaca": 2, "sharegpt": 6}
    assert all(c == 1 for c in (e.count for e in r.scaled(1e-9).entries))
    with pytest.raises(RecipeError, match="--scale must be"):
        r.scaled(0)


def entry(**kw):
    return {"name": "a", "path": "x.json", "reader": "alpaca", "count": 3, **kw}


@pytest.mark.parametrize("raw, message", [
    ({"sources": [entry(cout=3)]}, r"sources\[0\] \(a\): unknown key\(s\) \['cout'\]"),
    ({"sources": [{"name": "a", "path": "x", "reader": "alpaca"}]}, r"\(a\): missing key\(s\) \['count'\]"),
    ({"sources": [entry(reader="alpacca")]}, r"\(a\): 'reader' must be one of"),
    ({"sources": [entry(count=-1)]}, r"\(a\): 'count' must be an integer >= 0, got -1"),
    ({"sources": [entry(count=2.5)]}, r"'count' must be an integer"),
    ({"sources": [entry(name="A b")]}, r"'name' must be \[a-z0-9_\]\+"),
    ({"sources": [entry(fewshot=0.5)]}, r"\['fewshot'\] only apply to templated readers"),
    ({"sources": [entry(reader="apps", fewshot=2)]}, r"'fewshot' must be a number in \[0, 1\]"),
    ({"sources": [entry(on_bad_row="ignore")]}, r"'on_bad_row' must be one of \['error', 'skip'\]"),
    ({"sources": [entry(), entry()]}, r"source name 'a' is used twice"),
    ({"sources": [entry()], "sed": 1}, r"unknown top-level key\(s\) \['sed'\]"),
    ({"sources": []}, r"'sources' must be a non-empty list"),
])
def test_bad_recipe_names_entry_and_key(raw, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw, file="r.yaml")


def test_unreadable_recipe_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(RecipeError, match="bad.yaml: invalid YAML"):
        load_recipe(str(bad))
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"sources": [entry(reader="apps", fewshot=0.25, max_shots=2)]}))
    e = load_recipe(str(ok)).entries[0]
    assert (e.fewshot, e.max_shots, e.with_options, e.split, e.on_bad_row) == (0.25, 2, 0.5, "train", "error")
