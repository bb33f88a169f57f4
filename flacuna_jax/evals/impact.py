"""IMPACT, the paper's writing evaluation (Table 5), as InstructEval's subjective.py at e2eb966 runs it.

Data: `declare-lab/InstructEvalImpact`'s `data.jsonl`, 200 records {"Category", "Definition",
"Prompt"} (50 in each of informative, professional, argumentative, creative), also as CSV (read as
InstructEval reads one: pandas, empty cells ""), parquet, or a `datasets.save_to_disk` dir (its
"train" split, the split InstructEval loads). Other fields (a previous run's "Answer", "Review",
"Score") are ignored. A record without the three text fields is an error naming the file and record.

Answer: `write_answers` with InstructEval's LLaMA class, i.e. the raw prompt `Definition + " " +
Prompt` (no chat template; BOS only where the tokenizer adds one), `generate(max_new_tokens=1024)`
with nothing else passed (greedy unless the checkpoint's generation_config turns sampling on, see the
README), the new tokens decoded with special tokens skipped; its `max_input_length=512` is never
applied to a LLaMA (it truncates only "65b" paths). `prompt_style="flacuna"` is instead the template
the paper's section 3.4 found better for Flacuna: the Vicuna system prompt, then
`" USER: {Definition}\\n\\n{Prompt}\\nOutput: ASSISTANT:"`.

Reviews: `score_answers` asks the judge, per answer, once per mode at temperature 0: relevance
(`impact_rubrics.RELEVANCE` with the answer and the record's Prompt) and coherence
(`impact_rubrics.COHERENCE`, the answer only). The score is read from the review by InstructEval's
loop: every character with `str.isdigit()` overwrites the score with `int(char)`, so the LAST digit
wins ("4/5" -> 5; its comment says "first", its loop does not); a score outside 1..5 (no digit at all
leaves 0; "10" ends in 0) becomes 1. One knowing difference: a character that `isdigit()` but that
`int()` rejects (a superscript "²") makes InstructEval raise and stop; it is skipped here.

Aggregate: per category and mode, the mean score (Table 5's cells, on the 1-5 scale); "Avg." is
the mean over all answers (InstructEval's printed `np.mean(scores)`; with 50 per category it equals
the mean of the four). `Result.score` is the mean of the two averages; `Result.tasks` holds
"<Category>/relevance" and "<Category>/coherence". A review that could not be had (the judge failed
after its retries) fails the benchmark with `IncompleteReviews`, which carries the scored answers so
they still reach preds.jsonl; every review already received is in the judge's cache, so rerunning the
same command asks the judge only for the missing ones.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, Result, Scored, TaskResult,
                                         by_task)
from flacuna_jax.evals.impact_rubrics import TEMPLATES, judge_prompt

FIELDS = ("Category", "Definition", "Prompt")
MODES = tuple(TEMPLATES)  # ("relevance", "coherence")
MAX_NEW_TOKENS = 1024  # write_answers: select_model(max_output_length=1024)
REQUEST = Generate(max_new_tokens=MAX_NEW_TOKENS, max_input_tokens=2048)
PROMPT_STYLES = ("instructeval", "flacuna")


class IncompleteReviews(ValueError):
    """Some reviews failed; `scored` holds every answer (and the reviews that were had)."""

    def __init__(self, message: str, scored: Sequence[Scored]):
        super().__init__(message)
        self.scored = list(scored)


# ------------------------------------------------------------------------------ the data

def _records(path: Path) -> Iterable[tuple[str, Any]]:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise BenchmarkInputError(f"{path}: not a datasets.save_to_disk directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise BenchmarkInputError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
            ds = ds["train"]
        return ((f"{path}: record {i + 1}", r) for i, r in enumerate(ds))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise BenchmarkInputError(f"{path}: not a readable parquet file ({e})") from None
        return ((f"{path}: record {i + 1}", r) for i, r in enumerate(rows))
    if path.suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path).fillna(value="")  # as SubjectiveData.load reads a CSV
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise BenchmarkInputError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
        # record N is the file's line N + 1 (line 1 is the header), as a user would look it up
        return ((f"{path}: record {i + 1}", r) for i, r in enumerate(frame.to_dict(orient="records")))
    from flacuna_jax.jsonl import read_objects

    return read_objects(path, BenchmarkInputError)


def read_records(path: str | Path) -> list[dict[str, str]]:
    """The records' three fields, in file order, each checked (a missing or non-text field names the record)."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkInputError(f"{path}: not found")
    out = []
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise BenchmarkInputError(f"{where}: expected an object with {', '.join(FIELDS)}")
        bad = [f for f in FIELDS if not isinstance(rec.get(f), str)]
        if bad:
            raise BenchmarkInputError(f"{where}: {', '.join(repr(f) for f in bad)} missing or not text "
                                      f"(IMPACT records are {{{', '.join(repr(f) + ': str' for f in FIELDS)}}})")
        if not rec["Prompt"].strip():
            raise BenchmarkInputError(f"{where}: 'Prompt' is empty")
        out.append({f: rec[f] for f in FIELDS})
    if not out:
        raise BenchmarkInputError(f"{path}: no IMPACT records")
    return out


# ------------------------------------------------------------------------------ prompts and the score rule

def generation_prompt(record: dict[str, str], style: str = "instructeval") -> str:
    """What the model under test is given, raw."""
    if style == "instructeval":
        return record["Definition"] + " " + record["Prompt"]
    if style == "flacuna":
        from flacuna_jax.templates import SYSTEM

        return f"{SYSTEM} USER: {record['Definition']}\n\n{record['Prompt']}\nOutput: ASSISTANT:"
    raise BenchmarkInputError(f"unknown IMPACT prompt style {style!r} (one of {', '.join(PROMPT_STYLES)})")


def last_digit(review: str) -> int | None:
    """The value of the review's last character that `isdigit()` and `int()` accepts; None if none."""
    value = None
    for char in review:
        if char.isdigit():
            try:
                value = int(char)
            except ValueError:  # "²" and the like: InstructEval raises here
                continue
    return value


def review_score(review: str) -> int:
    """InstructEval's rule (module docstring): the last digit of the review, 1 when outside 1..5."""
    value = last_digit(review)
    return value if value is not None and 1 <= value <= 5 else 1


def fallback_reason(review: str) -> str | None:
    """Why `review_score` gave the fallback 1 rather than a digit of the review: "no_digit",
    "out_of_range" (0 or 6-9 last), or None."""
    value = last_digit(review)
    if value is None:
        return "no_digit"
    return None if 1 <= value <= 5 else "out_of_range"


# ------------------------------------------------------------------------------ the benchmark

@dataclasses.dataclass
class ImpactBenchmark:
    """The `flacuna_jax.evals.benchmark` contract; `judge` is anything with
    `ask(requests, on_done) -> replies` (`flacuna_jax.evals.judge.ChatJudge`)."""

    examples_: list[Example]
    judge: Any
    prompt_style: str = "instructeval"
    name: str = "impact"
    request: Generate = REQUEST

    def examples(self, fits: Callable[[str], bool]) -> list[Example]:
        return self.examples_  # no shots to drop; InstructEval never truncates a LLaMA's prompt

    def score(self, examples: Sequence[Example], outputs: Sequence[Sequence[str]]) -> list[Scored]:
        from flacuna_jax.evals.judge import JudgeRequest
        from flacuna_jax.evals.runner import Progress

        requests = [JudgeRequest(mode, judge_prompt(mode, out[0], ex.meta["Prompt"]),
                                 f"impact {ex.task} #{ex.id} {mode}")
                    for ex, out in zip(examples, outputs) for mode in MODES]
        bar = Progress("judge", len(requests))
        replies = self.judge.ask(requests, on_done=bar.update)
        scored = []
        for k, (ex, out) in enumerate(zip(examples, outputs)):
            detail: dict[str, Any] = {"reviews": {}, "scores": {}, "errors": []}
            for m, mode in enumerate(MODES):
                reply = replies[2 * k + m]
                detail["reviews"][mode] = reply.text
                if reply.text is None:
                    detail["scores"][mode] = None
                    detail["errors"].append(reply.error)
                else:
                    detail["scores"][mode] = review_score(reply.text)
                    if (note := fallback_reason(reply.text)) is not None:
                        detail.setdefault("notes", {})[mode] = note
            done = [s for s in detail["scores"].values() if s is not None]
            detail["pred_fields"] = {"label": "", "correct": None,
                                     **{mode: detail["scores"][mode] for mode in MODES},
                                     **{f"{mode}_review": detail["reviews"][mode] for mode in MODES}}
            scored.append(Scored(ex, out[0], sum(done) / len(done) if done else 0.0, detail))
        stats = getattr(self.judge, "stats", {})
        if stats:
            print(f"impact: judge {getattr(self.judge, 'model', '?')} at {getattr(self.judge, 'base_url', '?')}: "
                  f"{stats['requests']} reviews, {stats['cached']} from the cache, {stats['sent']} asked "
                  f"({stats['retried']} retries), {stats['failed']} failed", file=sys.stderr)
        return scored

    def aggregate(self, scored: Sequence[Scored]) -> Result:
        errors = [e for s in scored for e in s.detail["errors"]]
        if errors:
            cache = getattr(getattr(self.judge, "cache", None), "path", None)
            where = f" (every review received is in the judge cache {cache})" if cache else ""
            raise IncompleteReviews(f"{len(errors)} of {2 * len(scored)} reviews failed, first: {errors[0]}; "
                                    f"rerun the same command to ask only for the missing ones{where}", scored)
        if not scored:
            raise BenchmarkInputError("impact: no answers were scored")
        tasks: dict[str, TaskResult] = {}
        for task, group in by_task(scored).items():
            for mode in MODES:
                mean = sum(s.detail["scores"][mode] for s in group) / len(group)
                tasks[f"{task}/{mode}"] = TaskResult(mean, len(group))
        means = self.means(scored)
        return Result((means["relevance"] + means["coherence"]) / 2, len(scored), tasks)

    @staticmethod
    def means(scored: Sequence[Scored]) -> dict[str, float]:
        return {mode: sum(s.detail["scores"][mode] for s in scored) / len(scored) for mode in MODES}

    def summary(self, scored: Sequence[Scored]) -> dict:
        """results.json's extra keys: both averages, the judge, the prompt style, the fallback counts."""
        notes = Counter(f"{mode}_{note}" for s in scored for mode, note in s.detail.get("notes", {}).items())
        return {**self.means(scored), "scale": "1-5",
                "judge": {"url": getattr(self.judge, "base_url", None), "model": getattr(self.judge, "model", None)},
                "prompt_style": self.prompt_style,
                "reviews_scored_1_by_the_fallback": {f"{m}_{k}": notes.get(f"{m}_{k}", 0)
                                                     for m in MODES for k in ("no_digit", "out_of_range")}}


def load(path: str, options: Options, judge: Any = None, prompt_style: str = "instructeval") -> ImpactBenchmark:
    if judge is None:
        raise BenchmarkInputError("impact: needs a judge (--judge-url URL --judge-model NAME)")
    records = read_records(path)
    generation_prompt(records[0], prompt_style)  # an unknown style fails here, before any generation
    seen: Counter[str] = Counter()
    examples = []
    for i, rec in enumerate(records):
        seen[rec["Category"]] += 1
        if options.max_examples is not None and seen[rec["Category"]] > options.max_examples:
            continue
        examples.append(Example(rec["Category"], i, generation_prompt(rec, prompt_style), "", meta=rec))
    return ImpactBenchmark(examples, judge, prompt_style)
