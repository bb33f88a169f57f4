"""What an evaluation writes: results.json, preds.jsonl and the paper's tables.

results.json: {"benchmarks": {NAME: {"score": fraction, "n": int, "tasks": {TASK: {"score", "n"}}}}, ...}
preds.jsonl, one line per scored example: {"benchmark", "task", "id", "prompt", "output", "label", "correct"}.

The printed tables follow the Flacuna paper (arXiv 2307.02053): Table 2 (problem solving, the few-shot
block: MMLU 5-shot, BBH 3-shot, DROP 3-shot, CRASS 3-shot, HumanEval 0-shot, and their average) and
Table 4 (HHH alignment per category and the average), in percent with one decimal, the model's row
beside the paper's. Where the reference rows come from:

- Table 2, VICUNA-13B and FLACUNA-13B: the Flacuna model card (huggingface.co/declare-lab/flacuna-13b-v1.0,
  README "Problem Solving Ability"), which reproduces the paper's few-shot block. InstructEval's own
  leaderboard at e2eb966 (docs/problem_solving_leaderboard.csv) lists a different Vicuna-13B
  evaluation: 49.7, 37.1, 32.9, 60.9, 15.2, average 39.2.
- Table 4, VICUNA-13B: InstructEval's docs/alignment_leaderboard.csv at e2eb966 (the leaderboard the
  paper copies). FLACUNA-13B's HHH row was not in any source reachable offline here; it prints "-".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from flacuna_jax.evals.benchmark import Result, Scored

TABLE2 = ("mmlu", "bbh", "drop", "crass", "humaneval")
TABLE2_HEAD = {"mmlu": "MMLU", "bbh": "BBH", "drop": "DROP", "crass": "CRASS", "humaneval": "HumanEval"}
PAPER_SHOTS = {"mmlu": 5, "bbh": 3, "drop": 3, "crass": 3, "humaneval": 0}
TABLE2_PAPER = {  # percent; see the module docstring for the source
    "VICUNA-13B": {"mmlu": 50.6, "bbh": 37.6, "drop": 32.6, "crass": 60.9, "humaneval": 11.6, "avg": 38.7},
    "FLACUNA-13B": {"mmlu": 51.1, "bbh": 39.3, "drop": 43.6, "crass": 74.1, "humaneval": 11.0, "avg": 43.8},
}
TABLE4 = ("harmless", "helpful", "honest", "other")
TABLE4_HEAD = {"harmless": "Harmlessness", "helpful": "Helpfulness", "honest": "Honesty", "other": "Other"}
TABLE4_PAPER = {
    "VICUNA-13B": {"harmless": 60.3, "helpful": 70.1, "honest": 55.1, "other": 78.2, "avg": 65.9},
    "FLACUNA-13B": {},
}


def results_dict(results: Mapping[str, Result], more: Mapping[str, Mapping] | None = None) -> dict:
    """{NAME: {"score", "n", "tasks": {TASK: {"score", "n"}}}}, plus `more[NAME]`'s keys (HumanEval's pass@k)."""
    return {name: {"score": r.score, "n": r.n, "tasks": {t: {"score": x.score, "n": x.n} for t, x in r.tasks.items()},
                   **(more or {}).get(name, {})} for name, r in results.items()}


def write_results(path: str | Path, benchmarks: Mapping, extra: Mapping | None = None) -> None:
    """results.json: {"benchmarks": `results_dict(...)`, **extra}."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmarks": benchmarks, **(extra or {})}, indent=2) + "\n")


def prediction_records(benchmark: str, scored: Sequence[Scored]) -> list[dict]:
    return [{"benchmark": benchmark, "task": s.example.task, "id": s.example.id, "prompt": s.example.prompt,
             "output": s.output, "label": s.example.label,
             "correct": bool(s.correct) if isinstance(s.correct, bool) else float(s.correct)} for s in scored]


def write_predictions(path: str | Path, by_benchmark: Mapping[str, Sequence[Scored]]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for name, scored in by_benchmark.items():
            for rec in prediction_records(name, scored):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _table(title: str, head: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    cells = [["Model", *head]] + [[name, *(_cell(v) for v in values)] for name, values in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([title, fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]])


def _mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def table2(results: Mapping[str, Result], model_name: str, shots: int | None = None) -> str | None:
    """The paper's Table 2 layout for the problem-solving benchmarks that were run (None if none was)."""
    if not any(b in results for b in TABLE2):
        return None
    shot = lambda b: PAPER_SHOTS[b] if shots is None or b == "humaneval" else shots
    head = [f"{TABLE2_HEAD[b]} ({shot(b)}-shot)" for b in TABLE2] + ["Avg."]
    ours = [100 * results[b].score if b in results else None for b in TABLE2]
    rows = [(name, [paper.get(b) for b in TABLE2] + [paper.get("avg")]) for name, paper in TABLE2_PAPER.items()]
    title = "Problem solving (layout of the Flacuna paper's Table 2; paper rows are its few-shot block)"
    return _table(title, head, rows + [(model_name, ours + [_mean(ours)])])


def table4(results: Mapping[str, Result], model_name: str) -> str | None:
    if "hhh" not in results:
        return None
    head = [TABLE4_HEAD[c] for c in TABLE4] + ["Avg."]
    tasks = results["hhh"].tasks
    ours = [100 * tasks[c].score if c in tasks else None for c in TABLE4]
    rows = [(name, [paper.get(c) for c in TABLE4] + [paper.get("avg")]) for name, paper in TABLE4_PAPER.items()]
    return _table("Alignment, HHH (layout of the Flacuna paper's Table 4)", head,
                  rows + [(model_name, ours + [100 * results["hhh"].score])])


def format_tables(results: Mapping[str, Result], model_name: str, shots: int | None = None) -> str:
    parts = [t for t in (table2(results, model_name, shots), table4(results, model_name)) if t]
    per_task = []
    for name, r in results.items():
        if name not in TABLE2 + ("hhh",) or len(r.tasks) > 1:
            per_task.append(f"{name}: {100 * r.score:.1f} over {r.n} examples; " + ", ".join(
                f"{t} {100 * x.score:.1f} ({x.n})" for t, x in r.tasks.items()))
    return "\n\n".join(parts + (["\n".join(per_task)] if per_task else []))
