"""One reader per published schema, read through ``datasets`` from local files; bad rows name the row."""

import json

import pytest

from flacuna_jax.data.flan_mini.code_readers import first_paragraph, strip_docstring
from flacuna_jax.data.flan_mini.readers import READERS
from flacuna_jax.data.flan_mini.recipe import Entry
from flacuna_jax.data.flan_mini.rows import RowSource
from flacuna_jax.data.records import DataError
from tests import flan_mini_sources as fx


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return fx.write_sources(tmp_path_factory.mktemp("flan_mini_sources"), 12)


def read_all(path, reader, cache, **kw):
    src = RowSource(Entry("s", path, reader, 1, **kw), cache)
    r = READERS[reader]
    return [(i, sub, r.unit(row, sub, src.where(i))) for i, row in src.rows() for sub in r.units(row, src.where(i))]


def test_flan_rows_become_one_exchange_with_task_and_template_type(paths, tmp_path):
    units = read_all(paths["cot"], "flan", str(tmp_path))
    assert len(units) == 12
    _, _, u = units[1]
    row = fx.flan_rows("cot", 12)[1]
    assert u["conversations"] == [{"from": "human", "value": row["inputs"].strip()},
                                  {"from": "gpt", "value": row["targets"].strip()}]
    assert (u["task"], u["template_type"]) == ("cot_task1", "zs_noopt")


def test_alpaca_input_follows_the_instruction(paths, tmp_path):
    units = read_all(paths["gpt4_alpaca"], "alpaca", str(tmp_path))
    rows = fx.alpaca_rows(12, "gpt4")
    assert units[0][2]["conversations"][0]["value"] == rows[0]["instruction"] and units[0][2]["task"] == "instruction"
    assert units[1][2]["conversations"][0]["value"] == f"{rows[1]['instruction']}\n\n{rows[1]['input']}"
    assert units[1][2]["conversations"][1]["value"] == rows[1]["output"] and units[1][2]["task"] == "with_input"


def test_sharegpt_roles_mapped_and_conversations_kept(paths, tmp_path):
    units = read_all(paths["sharegpt"], "sharegpt", str(tmp_path))
    assert [u["conversations"] for _, _, u in units] == [r["conversations"] for r in fx.sharegpt_rows(12)]
    assert units[0][2]["task"] == "multi_turn" and units[1][2]["task"] == "single_turn"
    u = READERS["sharegpt"].unit({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "hi"},
                                                    {"from": "chatgpt", "value": "hello"}]}, 0, "w")
    assert [t["from"] for t in u["conversations"]] == ["system", "human", "gpt"]


def test_code_search_net_drops_the_docstring_from_the_code(paths, tmp_path):
    units = read_all(paths["code_search_net"], "code_search_net", str(tmp_path))
    py = units[0][2]
    assert py["language"] == py["answer"] == "Python" and py["func_name"] == "add_0"
    assert py["docstring"] == "Return the sum of alpha delta values." and '"""' not in py["code"]
    assert py["code"] == "def add_0(x, y):\n    return x + y + 0" and py["function"].count('"""') == 2
    assert [u["language"] for _, _, u in units[:6]] == ["Python", "Go", "Java", "JavaScript", "PHP", "Ruby"]
    assert strip_docstring("/** Adds two. */\nint add() {}", "Adds two.", "java") == "int add() {}"
    assert strip_docstring("// Adds two.\nfunc Add() {}", "Adds two.", "go") == "func Add() {}"
    assert strip_docstring("int add() {}", "Adds two.", "java") == "int add() {}"
    assert first_paragraph("  One line\n  continues.\n\n  :param x: y") == "One line continues."


def test_code_contests_one_unit_per_solution_with_its_language(paths, tmp_path):
    units = read_all(paths["code_contests"], "code_contests", str(tmp_path))
    assert [(i, s) for i, s, _ in units[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)] and len(units) == 12
    assert [u["language"] for _, _, u in units[:3]] == ["Python 2", "C++", "Python 3"]
    row = fx.contest_rows(1)[0]
    assert units[1][2]["solution"] == row["solutions"]["solution"][1] and units[0][2]["description"] == row["description"]
    row["solutions"] = {"language": [0, 3, 3], "solution": ["x", "  ", "print(1)"]}  # unknown language, blank: no unit
    assert READERS["code_contests"].units(row, "w") == [2]


def test_apps_solutions_and_io_format_blocks(paths, tmp_path):
    units = read_all(paths["apps"], "apps", str(tmp_path))
    assert len(units) == 12 and [(i, s) for i, s, _ in units[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    std, call = units[0][2], units[3][2]
    assert "standard input" in std["io_"] and std["starter_"] == "" and std["answer"] == "introductory"
    assert "`solve_1`" in call["io_"] and call["starter_"].startswith("\n\nStart from this code:\ndef solve_1")
    row = dict(fx.apps_rows(1)[0], solutions="")
    assert READERS["apps"].units(row, "w") == []  # published rows without solutions: no unit, no error


@pytest.mark.parametrize("reader, row, message", [
    ("flan", {"inputs": "q", "task_name": "t", "template_type": "zs_opt"}, "missing field 'targets'"),
    ("flan", {"inputs": "q", "targets": 3, "task_name": "t", "template_type": "zs_opt"},
     "field 'targets' is int, expected a string"),
    ("flan", {"inputs": "  ", "targets": "a", "task_name": "t", "template_type": "zs_opt"}, "field 'inputs' is empty"),
    ("alpaca", {"instruction": "do", "input": "", "output": ""}, "field 'output' is empty"),
    ("alpaca", {"instruction": ["do"], "output": "x"}, "field 'instruction' is list"),
    ("sharegpt", {"conversations": "hi"}, "field 'conversations' is str, expected a list"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "turn 1: unknown role 'robot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "turn 1: field 'value' is empty"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
     "roles must alternate"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, "no answer"),
    ("code_search_net", dict(fx.csn_rows(1)[0], language="cobol"), "field 'language' is 'cobol'"),
    ("code_search_net", {k: v for k, v in fx.csn_rows(1)[0].items() if k != "whole_func_string"},
     "missing field 'whole_func_string'"),
    ("code_contests", dict(fx.contest_rows(1)[0], solutions={"language": [1], "solution": []}), "same length"),
    ("code_contests", dict(fx.contest_rows(1)[0], solutions={"language": [9], "solution": ["x"]}),
     r"solutions.language\[0\] is 9"),
    ("apps", dict(fx.apps_rows(1)[0], solutions="[1, 2"), "field 'solutions' is not valid JSON"),
    ("apps", dict(fx.apps_rows(1)[0], solutions=json.dumps([1])), "a JSON list of strings"),
])
def test_bad_row_is_one_line_naming_the_row(reader, row, message):
    r = READERS[reader]
    with pytest.raises(DataError, match=message) as e:
        for sub in r.units(row, "data.json: row 7"):
            r.unit(row, sub, "data.json: row 7")
    assert str(e.value).startswith("data.json: row 7") and "\n" not in str(e.value)


def test_local_formats_through_datasets_read_the_same_rows(tmp_path):
    rows = fx.alpaca_rows(5, "x")
    want = read_all(fx.write_json(tmp_path / "a.json", rows), "alpaca", str(tmp_path / "c"))
    fx.write_jsonl(tmp_path / "b.jsonl", rows)
    (tmp_path / "dir").mkdir()
    fx.write_parquet(tmp_path / "dir" / "part-0.parquet", rows)
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    for p in (tmp_path / "b.jsonl", tmp_path / "dir", str(tmp_path / "dir" / "*.parquet"), tmp_path / "disk"):
        assert read_all(str(p), "alpaca", str(tmp_path / "c")) == want, p
    assert read_all(str(tmp_path / "b.jsonl"), "alpaca", str(tmp_path / "c"), streaming=True) == want
    src = RowSource(Entry("s", str(tmp_path / "b.jsonl"), "alpaca", 1), str(tmp_path / "c"))
    assert [i for i, _ in src.rows([1, 3])] == [1, 3] and src.num_rows == 5


def test_missing_source_and_unknown_format_are_one_line(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file or directory"):
        RowSource(Entry("s", str(tmp_path / "nope.json"), "alpaca", 1))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown data format"):
        RowSource(Entry("s", str(tmp_path / "x.txt"), "alpaca", 1))
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n')
    with pytest.raises(DataError, match=r"broken.json:2: malformed JSON in element 1"):
        RowSource(Entry("s", str(tmp_path / "broken.json"), "alpaca", 1), str(tmp_path / "c"))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: cannot load \(") as e:
        RowSource(Entry("s", str(tmp_path / "broken.jsonl"), "alpaca", 1), str(tmp_path / "c"))
    assert "\n" not in str(e.value)


def test_json_arrays_are_streamed_in_a_window_whatever_its_size(tmp_path):
    from flacuna_jax.data.flan_mini.rows import iter_json_array

    rows = fx.sharegpt_rows(7) + [{"n": 123456789, "s": "naïve ☃ café", "l": [1, 2.5, None, True]}, 42, "x"]
    p = tmp_path / "a.json"
    p.write_text("\ufeff [\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 20):  # window boundaries inside numbers, strings and multi-byte characters
        assert list(iter_json_array(str(p), chunk)) == rows, chunk
    (tmp_path / "e.json").write_text("[ ]")
    assert list(iter_json_array(str(tmp_path / "e.json"), 2)) == []
    for text, message in (('[{"a": 1},\n{"a": }]', r"b.json:2: malformed JSON in element 1"),
                          ('[{"a": 1} {"a": 2}]', r"after element 0: expected ',' or '\]'"),
                          ('{"a": 1}', "expected a JSON array"), ('[{"a": 1}] x', "extra data after the JSON array"),
                          ('[{"a": 1}', "malformed JSON after element 0")):
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(DataError, match=message):
            list(iter_json_array(str(tmp_path / "b.json"), 4))


def test_hub_entries_reach_datasets_with_their_config_split_revision_and_files(monkeypatch):
    """The hub is a local stand-in: what matters is what load_dataset is asked."""
    import datasets

    asked = []

    def load_dataset(path, name=None, **kw):
        asked.append((path, name, kw))
        return datasets.Dataset.from_list(fx.alpaca_rows(3, "h"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    e = Entry("s", "hf://org/data@v2", "alpaca", 2, split="test", config="all", data_files="data/*.parquet")
    src = RowSource(e, "/tmp/cache")
    path, name, kw = asked[0]
    assert (path, name, kw["revision"], kw["split"], kw["data_files"], kw["streaming"], kw["cache_dir"]) == \
        ("org/data", "all", "v2", "test", "data/*.parquet", False, "/tmp/cache")
    assert src.num_rows == 3 and src.where(1) == "hf://org/data@v2 [test]: row 1"
    with pytest.raises(DataError, match="expected hf://owner/name"):
        RowSource(Entry("s", "hf://", "alpaca", 1))


def test_hub_json_files_are_fetched_and_read_in_a_window(monkeypatch, tmp_path):
    import huggingface_hub

    local = fx.write_json(tmp_path / "ShareGPT_V3.json", fx.sharegpt_rows(4))
    fetched = []

    def download(repo_id, filename, repo_type, revision):
        fetched.append((repo_id, filename, repo_type, revision))
        return local

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    units = read_all("hf://anon/ShareGPT", "sharegpt", str(tmp_path / "c"), data_files="ShareGPT_V3.json")
    assert fetched == [("anon/ShareGPT", "ShareGPT_V3.json", "dataset", None)]
    assert [u["conversations"] for _, _, u in units] == [r["conversations"] for r in fx.sharegpt_rows(4)]
    assert len(list((tmp_path / "c" / "flacuna_jax_json_lines").glob("*.jsonl"))) == 1
