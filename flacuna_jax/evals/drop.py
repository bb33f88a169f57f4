"""DROP as InstructEval's drop.py at e2eb966 evaluates it.

Input, either
- the dev set as AllenNLP publishes it, `drop_dataset_dev.json`: {section_id: {"passage", "qa_pairs":
  [{"question", "query_id", "answer", "validated_answers": [...]}]}}, turned into rows exactly as the
  hub's `drop` loader did (InstructEval loads its validation split): per qa pair, the spans of its
  `validated_answers` in order (a number as is, a date as "day month year" stripped, each span); a
  pair whose answers mix kinds or give nothing is skipped, as the loader skips it (reported); or
- the hub's layout, rows {"passage", "question", "answers_spans": {"spans": [...], ...}}, as JSONL,
  parquet or a `datasets.save_to_disk` directory (its "validation" split if it holds several).

Then InstructEval's procedure: keep the rows whose stripped spans are all equal (reported); draw
the 3 shots with `random.seed(0); random.sample(rows, 3)`; score every row whose passage is not a
shot's passage:

    for each shot "{passage.strip()} {question.strip()}\\nAnswer: {answer}\\n\\n"
    + "{passage.strip()} {question.strip()}\\nAnswer:"

greedy decoding of 8 new tokens, correct when output.strip().startswith(first span stripped); the
score is the mean over the scored rows. `id` is the row's position among the loader's rows.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, PrefixBenchmark,
                                         fit_shots, micro_average)

SHOTS = 3
REQUEST = Generate(max_new_tokens=8, max_input_tokens=2048)


def answer_spans(answers: Any, where: str) -> list[str] | None:
    """The hub loader's spans of a list of DROP answers; None where it skips the pair."""
    if not isinstance(answers, list):
        raise BenchmarkInputError(f"{where}: 'validated_answers' is not a list")
    spans: list[str] = []
    for a in answers:
        if not isinstance(a, dict):
            raise BenchmarkInputError(f"{where}: an answer is not an object")
        number, date, texts = a.get("number", ""), a.get("date") or {}, a.get("spans") or []
        date_text = " ".join(str(date.get(k, "")) for k in ("day", "month", "year")).strip()
        has_date = any(date.get(k, "") for k in ("day", "month", "year"))
        if sum((number != "", has_date, bool(texts))) > 1:
            return None
        if number != "":
            spans.append(str(number))
        if has_date:
            spans.append(date_text)
        spans += [str(t) for t in texts]
    return spans or None


def rows_from_published(path: Path) -> tuple[list[dict], int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkInputError(f"{path}: not valid JSON ({e})") from None
    rows, skipped = [], 0
    for section_id, section in data.items():
        where = f"{path}: section {section_id}"
        if not isinstance(section, dict) or not isinstance(section.get("passage"), str) \
                or not isinstance(section.get("qa_pairs"), list):
            raise BenchmarkInputError(f'{where}: expected {{"passage": str, "qa_pairs": [...]}}')
        for j, qa in enumerate(section["qa_pairs"]):
            if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                raise BenchmarkInputError(f"{where}: qa pair {j}: expected an object with a string 'question'")
            spans = answer_spans(qa.get("validated_answers", []), f"{where}: qa pair {j}")
            if spans is None:
                skipped += 1
                continue
            rows.append({"passage": section["passage"], "question": qa["question"], "spans": spans})
    return rows, skipped


def _hub_records(path: Path) -> Iterable[tuple[str, Any]]:
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "validation" not in ds:
                raise BenchmarkInputError(f"{path}: a DatasetDict without a 'validation' split ({', '.join(ds)})")
            ds = ds["validation"]
        return ((f"{path}: row {i}", r) for i, r in enumerate(ds))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return ((f"{path}: row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
    from flacuna_jax.jsonl import read_objects

    return read_objects(path, BenchmarkInputError)


def rows_from_hub_layout(path: Path) -> list[dict]:
    rows = []
    for where, r in _hub_records(path):
        spans = (r.get("answers_spans") or {}).get("spans") if isinstance(r, dict) else None
        if not (isinstance(r.get("passage"), str) and isinstance(r.get("question"), str)
                and isinstance(spans, list) and spans and all(isinstance(s, str) for s in spans)):
            raise BenchmarkInputError(f'{where}: expected {{"passage": str, "question": str, '
                                      '"answers_spans": {"spans": [str, ...]}}')
        rows.append({"passage": r["passage"], "question": r["question"], "spans": list(spans)})
    return rows


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise BenchmarkInputError(f"{path}: not found")
    if path.is_file() and path.suffix == ".json":
        rows, skipped = rows_from_published(path)
        if skipped:
            print(f"drop: {path}: skipped {skipped} qa pair(s) whose answers mix kinds or are empty "
                  "(as the hub's loader does)", file=sys.stderr)
    else:
        rows = rows_from_hub_layout(path)
    for i, r in enumerate(rows):
        r["id"] = i
    if not rows:
        raise BenchmarkInputError(f"{path}: no DROP rows")
    return rows


def as_prompt(row: dict, with_answer: bool) -> str:
    text = row["passage"].strip() + " " + row["question"].strip() + "\nAnswer:"
    return f"{text} {row['spans'][0].strip()}\n\n" if with_answer else text


def split(rows: list[dict], shots: int) -> tuple[list[dict], list[dict]]:
    """InstructEval's filter (one distinct answer) and seeded shot draw; test rows share no shot's passage."""
    kept = [r for r in rows if len({s.strip() for s in r["spans"]}) == 1]
    if len(kept) < len(rows):
        print(f"drop: kept {len(kept)} of {len(rows)} rows with a single distinct answer (InstructEval's filter)",
              file=sys.stderr)
    if shots > len(kept):
        raise BenchmarkInputError(f"drop: {shots} shots asked, only {len(kept)} rows")
    train = random.Random(0).sample(kept, k=shots)
    passages = {r["passage"] for r in train}
    return train, [r for r in kept if r["passage"] not in passages]


def load(path: str, options: Options) -> PrefixBenchmark:
    shots = SHOTS if options.shots is None else options.shots
    train, test = split(read_rows(Path(path)), shots)
    test = test[:options.max_examples]
    if not test:
        raise BenchmarkInputError(f"{path}: no DROP rows left to score")

    def build(fits: Callable[[str], bool]) -> list[Example]:
        out = []
        for row in test:
            end = as_prompt(row, False)

            def prompt(k: int) -> str:
                return "".join(as_prompt(s, True) for s in train[:k]) + end

            out.append(Example("drop", row["id"], fit_shots(prompt, len(train), fits), row["spans"][0].strip()))
        return out

    return PrefixBenchmark("drop", REQUEST, build, micro_average)
