"""What an evaluation writes: results.json, preds.jsonl and the paper's tables.

results.json: {"benchmarks": {NAME: {"score": fraction, "n": int, "tasks": {TASK: {"score", "n"}}}}, ...}
(IMPACT: scores on the judge's 1-5 scale, see `flacuna_jax.evals.impact`).
preds.jsonl, one line per scored example: {"benchmark", "task", "id", "prompt", "output", "label", "correct"}
(IMPACT adds each mode's score and raw review).

The printed tables follow the Flacuna paper (arXiv 2307.02053), the model's row beside the paper's
VICUNA-13B and FLACUNA-13B rows: Table 2 (problem solving, the few-shot block: MMLU 5-shot, BBH 3-shot,
DROP 3-shot, CRASS 3-shot, HumanEval 0-shot, and their average), Table 3 (0-shot MMLU, BBH, CRASS;
printed instead of Table 2 for a `--shots 0` run), Table 4 (HHH alignment per category and the
average) and Table 5 (IMPACT writing: relevance and coherence per category, and their averages).

Every paper cell comes from the paper's text as extracted from its PDF (../shared/paper/
flacuna-2307.02053.txt, the rows quoted beside each table below), printed as the paper prints it.
The extraction lost some characters: a lost decimal point is restored only where every digit is in
the text and the scale leaves one reading ("744" -> 74.4 in a column of percentages; "348" -> 3.48 on
the 1-5 scale); a lost digit is printed as "?" and never guessed (Table 3's CRASS column, Table 5's
last column). One cell is not in the text: Table 2's FLACUNA-13B MMLU reads "S11"; 51.1 is from the
Flacuna model card (huggingface.co/declare-lab/flacuna-13b-v1.0, "Problem Solving Ability"), which
reproduces Table 2's few-shot block and agrees with every other cell of both rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from flacuna_jax.evals.benchmark import Result, Scored

LOST = "?"  # a digit the paper's text extraction lost
SOURCE = "the Flacuna paper, arXiv 2307.02053"

TABLE2 = ("mmlu", "bbh", "drop", "crass", "humaneval")
TABLE2_HEAD = {"mmlu": "MMLU", "bbh": "BBH", "drop": "DROP", "crass": "CRASS", "humaneval": "HumanEval"}
PAPER_SHOTS = {"mmlu": 5, "bbh": 3, "drop": 3, "crass": 3, "humaneval": 0}
# Table 2, "Perf." columns. Text: "VICUNA 13B 50.6 44.5 37.6 +05 32.6 -3.0 60.9 42.1 11.6 -1.8 38.7 +0."
# and "FLACUNA 13B S11 $5.0 39.30 42.2 43.6 +8.0 74.1 +15.3 11.0 -2.4 43.8 +5." (MMLU: the model card's)
TABLE2_PAPER = {
    "VICUNA-13B": {"mmlu": "50.6", "bbh": "37.6", "drop": "32.6", "crass": "60.9", "humaneval": "11.6", "avg": "38.7"},
    "FLACUNA-13B": {"mmlu": "51.1", "bbh": "39.3", "drop": "43.6", "crass": "74.1", "humaneval": "11.0", "avg": "43.8"},
}
TABLE3 = ("mmlu", "bbh", "crass")
# Table 3. Text: "VICUNA 13B 48.3 28.3 65.FLACUNA 13B 49.4 32.5 67.Table 3" (CRASS's decimals lost)
TABLE3_PAPER = {
    "VICUNA-13B": {"mmlu": "48.3", "bbh": "28.3", "crass": "65." + LOST},
    "FLACUNA-13B": {"mmlu": "49.4", "bbh": "32.5", "crass": "67." + LOST},
}
TABLE4 = ("harmless", "helpful", "honest", "other")
TABLE4_HEAD = {"harmless": "Harmlessness", "helpful": "Helpfulness", "honest": "Honesty", "other": "Other"}
# Table 4. Text: "VICUNA 3B 62.0 66.1 52.4 744 63.7 +" and "FLACUNA 3B 724 71.2 70.5 83.7 745 +12."
TABLE4_PAPER = {
    "VICUNA-13B": {"harmless": "62.0", "helpful": "66.1", "honest": "52.4", "other": "74.4", "avg": "63.7"},
    "FLACUNA-13B": {"harmless": "72.4", "helpful": "71.2", "honest": "70.5", "other": "83.7", "avg": "74.5"},
}
TABLE5 = ("informative", "professional", "argumentative", "creative")
# Table 5, (Rel., Coh.) per category. Text: "VICUNA 13B 3.60 3.96 3.74 3.82 3.82 3.56 3.82 3.92 3.75 3."
# and "FLACUNA 13B 3.02 3.42 348 3.52 3.38 3.02 3.92 3.80 345 3." (Avg. Coh.: both decimals lost)
TABLE5_PAPER = {
    "VICUNA-13B": {"informative": ("3.60", "3.96"), "professional": ("3.74", "3.82"),
                   "argumentative": ("3.82", "3.56"), "creative": ("3.82", "3.92"), "avg": ("3.75", "3." + 2 * LOST)},
    "FLACUNA-13B": {"informative": ("3.02", "3.42"), "professional": ("3.48", "3.52"),
                    "argumentative": ("3.38", "3.02"), "creative": ("3.92", "3.80"), "avg": ("3.45", "3." + 2 * LOST)},
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
    """The common fields; a benchmark's `Scored.detail["pred_fields"]` adds or overrides some (IMPACT)."""
    return [{"benchmark": benchmark, "task": s.example.task, "id": s.example.id, "prompt": s.example.prompt,
             "output": s.output, "label": s.example.label,
             "correct": bool(s.correct) if isinstance(s.correct, bool) else float(s.correct),
             **s.detail.get("pred_fields", {})} for s in scored]


def write_predictions(path: str | Path, by_benchmark: Mapping[str, Sequence[Scored]]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for name, scored in by_benchmark.items():
            for rec in prediction_records(name, scored):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _cell(x, digits: int = 1) -> str:
    """Ours (a float, formatted here), the paper's (a string, as printed), or "-" (not run)."""
    return "-" if x is None else x if isinstance(x, str) else f"{x:.{digits}f}"


def _table(title: str, head: Sequence[str], rows: Sequence[tuple[str, Sequence]], digits: int = 1,
           source: str | None = None) -> str:
    cells = [["Model", *head]] + [[name, *(_cell(v, digits) for v in values)] for name, values in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [title, fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]]
    if source:
        lost = any(LOST in c for r in cells[1:] for c in r[1:])
        note = f"; {LOST} = a digit lost in the paper's text, not guessed)" if lost else ")"
        lines.append(f"(paper rows: {source}{note}")
    return "\n".join(lines)


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
    return _table(title, head, rows + [(model_name, ours + [_mean(ours)])],
                  source=f"{SOURCE}, Table 2; FLACUNA-13B MMLU from its model card")


def table3(results: Mapping[str, Result], model_name: str) -> str | None:
    """Table 3's layout (0-shot MMLU, BBH, CRASS) for a `--shots 0` run."""
    if not any(b in results for b in TABLE3):
        return None
    head = [f"{TABLE2_HEAD[b]} (0-shot)" for b in TABLE3]
    rows = [(name, [paper[b] for b in TABLE3]) for name, paper in TABLE3_PAPER.items()]
    ours = [100 * results[b].score if b in results else None for b in TABLE3]
    return _table("Problem solving, 0-shot (layout of the Flacuna paper's Table 3)", head,
                  rows + [(model_name, ours)], source=f"{SOURCE}, Table 3")


def table4(results: Mapping[str, Result], model_name: str) -> str | None:
    if "hhh" not in results:
        return None
    head = [TABLE4_HEAD[c] for c in TABLE4] + ["Avg."]
    tasks = results["hhh"].tasks
    ours = [100 * tasks[c].score if c in tasks else None for c in TABLE4]
    rows = [(name, [paper.get(c) for c in TABLE4] + [paper.get("avg")]) for name, paper in TABLE4_PAPER.items()]
    return _table("Alignment, HHH (layout of the Flacuna paper's Table 4)", head,
                  rows + [(model_name, ours + [100 * results["hhh"].score])], source=f"{SOURCE}, Table 4")


def impact_categories(result: Result) -> dict[str, dict[str, float]]:
    """{category as in the data: {"relevance", "coherence", "n"}} from the "<category>/<mode>" tasks."""
    out: dict[str, dict[str, float]] = {}
    for task, x in result.tasks.items():
        category, _, mode = task.rpartition("/")
        out.setdefault(category, {"n": x.n})[mode] = x.score
    return out


def table5(results: Mapping[str, Result], model_name: str, summary: Mapping | None = None) -> str | None:
    """Table 5's layout: Rel. and Coh. per category (the data's Category matched case-insensitively),
    then the averages over all answers; categories outside the four are listed below it."""
    if "impact" not in results:
        return None
    cats = impact_categories(results["impact"])
    by_name = {c.strip().lower(): v for c, v in cats.items()}
    head = [f"{c.capitalize()} {m}" for c in TABLE5 + ("avg",) for m in ("Rel.", "Coh.")]
    head[-2:] = ["Avg. Rel.", "Avg. Coh."]
    rows = [(name, [v for c in TABLE5 + ("avg",) for v in paper[c]]) for name, paper in TABLE5_PAPER.items()]
    ours = [by_name.get(c, {}).get(m) for c in TABLE5 for m in ("relevance", "coherence")]
    ours += [(summary or {}).get("relevance"), (summary or {}).get("coherence")]
    text = _table("Writing, IMPACT judged 1-5 (layout of the Flacuna paper's Table 5)", head,
                  rows + [(model_name, ours)], digits=2, source=f"{SOURCE}, Table 5 (its judge: ChatGPT)")
    others = [f"{c} Rel. {v['relevance']:.2f} Coh. {v['coherence']:.2f} ({v['n']})"
              for c, v in cats.items() if c.strip().lower() not in TABLE5]
    return text + ("\nimpact, other categories: " + ", ".join(others) if others else "")


def format_tables(results: Mapping[str, Result], model_name: str, shots: int | None = None,
                  more: Mapping[str, Mapping] | None = None) -> str:
    """The paper's tables for what was run (Table 3 instead of Table 2 at 0 shots), then one line per
    other benchmark, or per multi-task one, with its per-task scores."""
    problem = table3(results, model_name) if shots == 0 else table2(results, model_name, shots)
    tabled = set(TABLE3 if shots == 0 else TABLE2) | {"hhh", "impact"}
    parts = [t for t in (problem, table4(results, model_name),
                         table5(results, model_name, (more or {}).get("impact"))) if t]
    per_task = []
    for name, r in results.items():
        if name != "impact" and (name not in tabled or len(r.tasks) > 1):
            per_task.append(f"{name}: {100 * r.score:.1f} over {r.n} examples; " + ", ".join(
                f"{t} {100 * x.score:.1f} ({x.n})" for t, x in r.tasks.items()))
    return "\n\n".join(parts + (["\n".join(per_task)] if per_task else []))
