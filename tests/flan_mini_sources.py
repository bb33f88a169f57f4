"""Small sources in each FLAN-Mini source's published schema, written locally (nothing downloaded).

- FLAN collection submixes (``*_submix_original`` on the hub): parquet with ``inputs``, ``targets``,
  ``task_source``, ``task_name``, ``template_type``.
- ``code_search_net``: parquet with all eleven published columns.
- ``deepmind/code_contests``: parquet with the published nested columns (tests, solutions as
  struct-of-lists, time_limit struct ...).
- ``codeparrot/apps``: JSON lines as its ``train.jsonl`` (``solutions`` and ``input_output`` are
  JSON strings).
- GPT4-Alpaca / Code-Alpaca: a JSON array of ``{"instruction", "input", "output"}``.
- ShareGPT: a JSON array of ``{"id", "conversations": [{"from", "value"}]}``.

Text values hold no braces, so a template that leaves ``{placeholder}`` behind is visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()
FLAN_SUBMIXES = {"flan2021": "Flan2021", "t0": "P3", "niv2": "NIv2", "cot": "CoT"}
TEMPLATE_TYPES = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def flan_rows(submix: str, n: int) -> list[dict]:
    source = FLAN_SUBMIXES[submix]
    return [{"inputs": f"{words(i, 6)}\n\nQuestion {i} of {submix}: which word comes first?\n",
             "targets": f" {WORDS[(i * 7) % len(WORDS)]} ", "task_source": source,
             "task_name": f"{submix}_task{i % 3}", "template_type": TEMPLATE_TYPES[i % 4]} for i in range(n)]


CSN_LANGS = ("python", "go", "java", "javascript", "php", "ruby")


def csn_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        lang = CSN_LANGS[i % len(CSN_LANGS)]
        doc = f"Return the sum of {words(i, 2)} values.\n\nArgs:\n    x: the first value"
        if lang == "python":
            code = f'def add_{i}(x, y):\n    """{doc}"""\n    return x + y + {i}\n'
        else:
            code = f"function add_{i}(x, y) (\n  return x + y + {i};\n)\n"
        rows.append({
            "repository_name": f"owner{i}/repo", "func_path_in_repository": f"src/mod{i}.{lang}",
            "func_name": f"add_{i}", "whole_func_string": code, "language": lang, "func_code_string": code,
            "func_code_tokens": code.split(), "func_documentation_string": doc,
            "func_documentation_tokens": doc.split(), "split_name": "train",
            "func_code_url": f"https://example.invalid/owner{i}/repo/blob/main/src/mod{i}.{lang}#L1"})
    return rows


def _tests(i: int) -> dict:
    return {"input": [f"{i} {i + 1}\n"], "output": [f"{2 * i + 1}\n"]}


def contest_rows(n: int, solutions_per_problem: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        sols = [f"a, b = map(int, input().split())\nprint(a + b)  # solution {j} of {i}"
                for j in range(solutions_per_problem)]
        rows.append({
            "name": f"{i}_A. Sum of {words(i, 2)}", "description": f"Given two integers, print their sum. ({words(i, 4)})",
            "public_tests": _tests(i), "private_tests": _tests(i + 1), "generated_tests": _tests(i + 2),
            "source": 2, "difficulty": 7, "solutions": {"language": [(j % 4) + 1 for j in range(len(sols))], "solution": sols},
            "incorrect_solutions": {"language": [2], "solution": ["int main() ( return 1; )"]},
            "cf_contest_id": 1000 + i, "cf_index": "A", "cf_points": 500.0, "cf_rating": 800,
            "cf_tags": ["math"], "is_description_translated": False, "untranslated_description": "",
            "time_limit": {"seconds": 1, "nanos": 0}, "memory_limit_bytes": 256000000,
            "input_file": "", "output_file": ""})
    return rows


def apps_rows(n: int, solutions_per_problem: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        call = i % 2 == 1
        io = {"fn_name": f"solve_{i}", "inputs": [[1, 2]], "outputs": [3]} if call else \
            {"inputs": ["1 2\n"], "outputs": ["3\n"]}
        sols = [f"def solve_{i}(a, b):\n    return a + b  # {j}" if call else f"print(sum(map(int, input().split())))  # {j}"
                for j in range(solutions_per_problem)]
        rows.append({"problem_id": i, "question": f"Add two numbers: {words(i, 5)}.",
                     "solutions": json.dumps(sols), "input_output": json.dumps(io),
                     "difficulty": ("introductory", "interview", "competition")[i % 3],
                     "url": f"https://example.invalid/problem/{i}",
                     "starter_code": f"def solve_{i}(a, b):\n    pass" if call else ""})
    return rows


def alpaca_rows(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag}: rewrite the words {words(i, 3)} in reverse order.",
             "input": words(i + 1, 2) if i % 2 else "", "output": " ".join(reversed(words(i, 3).split()))}
            for i in range(n)]


def sharegpt_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        conv = [{"from": "human", "value": f"Tell me about {words(i, 2)}."},
                {"from": "gpt", "value": f"{words(i, 2)} are words number {i}."}]
        if i % 3 == 0:
            conv += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": f"Then {words(i + 1, 3)}."}]
        rows.append({"id": f"conv{i}_0", "conversations": conv})
    return rows


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_json(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_sources(d: Path, n: int = 60) -> dict[str, str]:
    """Every Table 1 source as a local file of ``n`` rows (``n // 3`` problems for the code contests)."""
    d.mkdir(parents=True, exist_ok=True)
    paths = {name: write_parquet(d / f"{name}_submix_original.parquet", flan_rows(name, n)) for name in FLAN_SUBMIXES}
    paths["code_search_net"] = write_parquet(d / "code_search_net.parquet", csn_rows(n))
    paths["code_contests"] = write_parquet(d / "code_contests.parquet", contest_rows(n // 3))
    paths["apps"] = write_jsonl(d / "apps_train.jsonl", apps_rows(n // 3))
    paths["gpt4_alpaca"] = write_json(d / "alpaca_gpt4_data.json", alpaca_rows(n, "gpt4"))
    paths["code_alpaca"] = write_json(d / "code_alpaca_20k.json", alpaca_rows(n, "code"))
    paths["sharegpt"] = write_json(d / "sharegpt.json", sharegpt_rows(n))
    return paths


def local_recipe(recipe_path: str, paths: dict[str, str], **overrides) -> str:
    """configs/flan_mini.yaml with each entry's path replaced by its local file (hub-only keys dropped)."""
    import yaml

    raw = yaml.safe_load(Path(recipe_path).read_text())
    for e in raw["sources"]:
        e["path"] = paths[e["name"]]
        for k in ("config", "data_files", "streaming", "split"):
            e.pop(k, None)
        e.update(overrides.get(e["name"], {}))
    return yaml.safe_dump(raw, sort_keys=False)
