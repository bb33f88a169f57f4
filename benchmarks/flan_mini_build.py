"""A full-size FLAN-Mini build (Table 1: 1.34M records) from synthetic sources: wall time and peak memory.

    python -m benchmarks.flan_mini_build [--scale 1.0] [--workers 2] [--tokenizer auto|none|DIR]
                                         [--oversample 1.25] [--keep DIR]

Writes synthetic sources in each source's published schema (the FLAN submixes, CodeSearchNet,
CodeContests as parquet; APPS as JSON lines; GPT4-Alpaca, Code-Alpaca, ShareGPT as JSON arrays), each
``--oversample`` times the rows its Table 1 count needs (the code contest datasets: problems with
8 solutions each), so that the build really samples. Then runs, in a child process, exactly

    python -m flacuna_jax.data build --recipe <configs/flan_mini.yaml, paths made local> --out OUT
        --workers W --tokenizer TOK --cache-dir <fresh>

with a cold ``datasets`` cache (the Arrow conversion of every source is part of the time), and
reports its wall time and peak resident memory: the largest sum over the build's process tree
(sampled every 0.2 s) of RSS and of its anonymous part (RSS also counts the pages of the
memory-mapped Arrow files being read, page cache the kernel can drop), and the largest single
process (``ru_maxrss``). The target applies to the RSS sum. The card's token lengths use
the LLaMA tokenizer in ../shared/assets when present (``auto``), else the demo tokenizer.
Target: <= 600 s and <= 2 GB at ``--scale 1`` on the 2-core machine. One JSON line, with the load
average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import ROOT, SHARED_ASSETS, child_env, emit

TARGET_SECONDS, TARGET_GB = 600, 2.0
SOLUTIONS_PER_PROBLEM = 8


class Words:
    """Random word runs from a fixed synthetic vocabulary: cheap text of a chosen length."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "gu", "ro"]
        vocab = ["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(3000)]
        self.stream = np.asarray(vocab, dtype=object)[rng.integers(0, len(vocab), 1 << 20)]
        self.rng = rng

    def text(self, lo: int, hi: int) -> str:
        n = int(self.rng.integers(lo, hi))
        start = int(self.rng.integers(0, len(self.stream) - n))
        return " ".join(self.stream[start:start + n])


def _parquet(path: Path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=50_000)
    return str(path)


def _json(path: Path, rows: list, lines: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        else:
            json.dump(rows, f)
    return str(path)


def flan(w: Words, path: Path, n: int, source: str, cot: bool = False) -> str:
    kinds = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
    inputs = [w.text(40, 220) + "\n\nOPTIONS:\n- yes\n- no" if i % 2 else w.text(40, 220) for i in range(n)]
    targets = [w.text(20, 90) if cot else w.text(1, 12) for _ in range(n)]
    return _parquet(path, {"inputs": inputs, "targets": targets, "task_source": [source] * n,
                           "task_name": [f"{source.lower()}_task{i % 400}" for i in range(n)],
                           "template_type": [kinds[i % 4] for i in range(n)]})


def code_search_net(w: Words, path: Path, n: int) -> str:
    langs = ("python", "go", "java", "javascript", "php", "ruby")
    rows = {k: [] for k in ("repository_name", "func_path_in_repository", "func_name", "whole_func_string", "language",
                            "func_code_string", "func_code_tokens", "func_documentation_string",
                            "func_documentation_tokens", "split_name", "func_code_url")}
    for i in range(n):
        lang, doc = langs[i % 6], w.text(8, 40)
        body = "\n".join("    x = " + w.text(3, 10).replace(" ", " + ") for _ in range(int(w.rng.integers(3, 12))))
        code = (f'def f{i}(x):\n    """{doc}"""\n{body}\n    return x\n' if lang == "python"
                else f"function f{i}(x) {{\n{body}\n    return x;\n}}\n")
        for k, v in (("repository_name", f"o/r{i % 5000}"), ("func_path_in_repository", f"src/m{i}.{lang}"),
                     ("func_name", f"f{i}"), ("whole_func_string", code), ("language", lang),
                     ("func_code_string", code), ("func_code_tokens", code.split()[:64]),
                     ("func_documentation_string", doc), ("func_documentation_tokens", doc.split()),
                     ("split_name", "train"), ("func_code_url", f"https://example.invalid/{i}")):
            rows[k].append(v)
    return _parquet(path, rows)


def _solutions(w: Words, k: int) -> list[str]:
    return ["\n".join("x = " + w.text(3, 12).replace(" ", " * ") for _ in range(int(w.rng.integers(4, 20))))
            + "\nprint(x)" for _ in range(k)]


def code_contests(w: Words, path: Path, problems: int) -> str:
    tests = {"input": ["1 2\n"], "output": ["3\n"]}
    cols = {k: [] for k in ("name", "description", "public_tests", "private_tests", "generated_tests", "source",
                            "difficulty", "solutions", "incorrect_solutions", "cf_contest_id", "cf_index", "cf_points",
                            "cf_rating", "cf_tags", "is_description_translated", "untranslated_description",
                            "time_limit", "memory_limit_bytes", "input_file", "output_file")}
    for i in range(problems):
        sols = _solutions(w, SOLUTIONS_PER_PROBLEM)
        values = (f"{i}_A. {w.text(2, 5)}", w.text(80, 300), tests, tests, tests, 2, 7,
                  {"language": [(j % 4) + 1 for j in range(len(sols))], "solution": sols},
                  {"language": [2], "solution": ["int main() { return 1; }"]}, 1000 + i, "A", 500.0, 800, ["math"],
                  False, "", {"seconds": 2, "nanos": 0}, 256_000_000, "", "")
        for k, v in zip(cols, values):
            cols[k].append(v)
    return _parquet(path, cols)


def apps(w: Words, path: Path, problems: int) -> str:
    levels = ("introductory", "interview", "competition")
    rows = [{"problem_id": i, "question": w.text(80, 300), "solutions": json.dumps(_solutions(w, SOLUTIONS_PER_PROBLEM)),
             "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}), "difficulty": levels[i % 3],
             "url": f"https://example.invalid/{i}", "starter_code": ""} for i in range(problems)]
    return _json(path, rows, lines=True)


def alpaca(w: Words, path: Path, n: int) -> str:
    return _json(path, [{"instruction": w.text(6, 30), "input": w.text(5, 40) if i % 3 == 0 else "",
                         "output": w.text(20, 200)} for i in range(n)])


def sharegpt(w: Words, path: Path, n: int) -> str:
    rows = []
    for i in range(n):
        turns = int(w.rng.integers(1, 4))
        conv = []
        for _ in range(turns):
            conv += [{"from": "human", "value": w.text(5, 60)}, {"from": "gpt", "value": w.text(30, 250)}]
        rows.append({"id": f"c{i}_0", "conversations": conv})
    return _json(path, rows)


def write_sources(d: Path, scale: float, oversample: float) -> tuple[dict[str, str], int]:
    recipe = yaml.safe_load((ROOT / "configs/flan_mini.yaml").read_text())
    need = {e["name"]: max(1, int(e["count"] * scale * oversample + 0.5)) for e in recipe["sources"]}
    w = Words(0)
    problems = lambda n: -(-n // SOLUTIONS_PER_PROBLEM)  # noqa: E731
    paths = {
        "flan2021": flan(w, d / "flan2021.parquet", need["flan2021"], "Flan2021"),
        "t0": flan(w, d / "t0.parquet", need["t0"], "P3"),
        "niv2": flan(w, d / "niv2.parquet", need["niv2"], "NIv2"),
        "cot": flan(w, d / "cot.parquet", need["cot"], "CoT", cot=True),
        "code_search_net": code_search_net(w, d / "code_search_net.parquet", need["code_search_net"]),
        "code_contests": code_contests(w, d / "code_contests.parquet", problems(need["code_contests"])),
        "apps": apps(w, d / "apps_train.jsonl", problems(need["apps"])),
        "gpt4_alpaca": alpaca(w, d / "alpaca_gpt4_data.json", need["gpt4_alpaca"]),
        "code_alpaca": alpaca(w, d / "code_alpaca_20k.json", need["code_alpaca"]),
        "sharegpt": sharegpt(w, d / "sharegpt.json", need["sharegpt"]),
    }
    for e in recipe["sources"]:
        e["path"] = paths[e["name"]]
        for k in ("config", "data_files", "split"):
            e.pop(k, None)
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return paths, sum(need.values())


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, summed over the process and its descendants. RSS includes the
    pages of the memory-mapped Arrow files that are being read (clean page cache the kernel can drop)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = anon = 0
    for q in procs:
        try:
            with open(f"/proc/{q.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss += int(fields["VmRSS"].split()[0]) << 10
            anon += int(fields["RssAnon"].split()[0]) << 10
        except (OSError, KeyError, ValueError):
            pass
    return rss, anon


def run_build(args: list[str]) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "flacuna_jax.data", "build", *args], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, anon = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.2)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_tree_gb": round(peak[0] / 2**30, 3),
            "peak_anon_tree_gb": round(peak[1] / 2**30, 3),
            "max_rss_one_process_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
            "output": json.loads(out.strip().splitlines()[-1]), "log_tail": err.strip().splitlines()[-12:]}


def tokenizer_dir(which: str, tmp: str) -> tuple[str | None, str]:
    if which == "none":
        return None, "none"
    if which != "auto":
        return which, which
    model = SHARED_ASSETS / "llama_tokenizer.model"
    from flacuna_jax import demo_assets

    if model.is_file():
        tok = Path(tmp) / "llama_tokenizer"
        tok.mkdir(exist_ok=True)
        shutil.copy(model, tok / "tokenizer.model")
        (tok / "tokenizer_config.json").write_text(json.dumps(demo_assets.TOKENIZER_CONFIG))
        return str(tok), "LLaMA tokenizer (../shared/assets)"
    return demo_assets.write_demo_assets(os.path.join(tmp, "demo"))["tokenizer"], "demo tokenizer"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default="auto", help="auto | none | a tokenizer dir")
    p.add_argument("--oversample", type=float, default=1.25, help="source rows per record asked")
    p.add_argument("--keep", default=None, help="write sources and output here (kept) instead of a temp dir")
    p.add_argument("--reuse-sources", action="store_true", help="with --keep: use the sources already there")
    a = p.parse_args(argv)
    load_before = os.getloadavg()
    tmp = a.keep or tempfile.mkdtemp(prefix="flan_mini_bench-")
    try:
        d = Path(tmp)
        (d / "src").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        meta = d / "src" / "rows.json"
        if a.reuse_sources and meta.exists():
            source_rows = json.loads(meta.read_text())["rows"]
        else:
            _, source_rows = write_sources(d / "src", a.scale, a.oversample)
            meta.write_text(json.dumps({"rows": source_rows, "scale": a.scale, "oversample": a.oversample}))
        gen_seconds = time.perf_counter() - t0
        tok, tok_name = tokenizer_dir(a.tokenizer, tmp)
        cache = d / f"hf_cache_{time.time_ns()}"  # cold: converting the sources is part of the build
        args = ["--recipe", str(d / "src" / "recipe.yaml"), "--out", str(d / "out"), "--workers", str(a.workers),
                "--scale", str(a.scale), "--cache-dir", str(cache)]
        args += ["--tokenizer", tok] if tok else []
        try:
            r = run_build(args)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        meets = r["seconds"] <= TARGET_SECONDS and r["peak_rss_tree_gb"] <= TARGET_GB
        return emit({
            "benchmark": "flan_mini_build", "records": r["output"]["records"], "scale": a.scale, "workers": a.workers,
            "tokenizer": tok_name, "source_rows": source_rows, "generate_sources_s": round(gen_seconds, 1),
            "seconds": r["seconds"], "peak_rss_tree_gb": r["peak_rss_tree_gb"], "peak_anon_tree_gb": r["peak_anon_tree_gb"],
            "max_rss_one_process_gb": r["max_rss_one_process_gb"],
            "output_gb": round(os.path.getsize(d / "out" / r["output"]["file"]) / 2**30, 3),
            "json_sha256": r["output"]["json_sha256"],
            "meets_target": meets if a.scale == 1.0 else None, "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "command": "python -m benchmarks.flan_mini_build " + " ".join(argv if argv is not None else sys.argv[1:]),
            "build_log": r["log_tail"]})
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
