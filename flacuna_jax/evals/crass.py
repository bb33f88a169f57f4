"""CRASS (counterfactual reasoning) as InstructEval's crass.py at e2eb966 evaluates it.

Input, either
- `CRASS_FTM_main_data_set.csv` as apergo-ai publishes it: a header line, then per line
  `id;batch;premise;question;correct answer;answer;answer;[answer]`, split on ";" as InstructEval
  splits it (no quoting); the options are the non-empty stripped ones of the first four, the first
  being the answer, shuffled with one `random.seed(0)` stream in file order; or
- BIG-bench's `crass_ai/task.json`, {"examples": [{"input", "target_scores": {option: 0|1}}]}: the
  input stands for "premise question", the option scored 1 goes first and the others follow in
  file order, then the same seeded shuffle (so both files give the same prompts for the same rows).

Prompt: InstructEval's three shots from the CRASS paper, then the question, each as

    "{premise.strip()} {question.strip()}\\nA. {o1}\\nB. {o2}\\nC. {o3}[\\nD. {o4}]\\nAnswer:" (+ " {letter}\\n\\n")

shots dropped from the end while the prompt is longer than 2048 tokens; greedy decoding of 8 new
tokens; correct when output.strip().startswith(the answer's letter); score = mean over questions.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, PrefixBenchmark,
                                         bigbench_examples, fit_shots, micro_average)

REQUEST = Generate(max_new_tokens=8, max_input_tokens=2048)
LETTERS = "ABCD"

# (premise, question, options, answer): the few-shot samples of the CRASS paper that InstructEval uses
PAPER_SHOTS = (
    ("A feather falls from a skyscraper.", "What would have happened if a computer had fallen from the skyscraper?",
     ("The computer would have remained intact.", "That is not possible.", "The computer would have been crushed."),
     "The computer would have been crushed."),
    ("A lightning hits a tree.", "What would have happened if a marble would have hit the tree?",
     ("It would have burned down.", "Nothing special would have happened.", "The tree would have kissed the lightning."),
     "Nothing special would have happened."),
    ("A man drinks a beer.", "What would have happened if the man had drunk a rainbow?",
     ("It would have been tasty.", "It would have been awful.", "That is not possible."), "That is not possible."),
)


def stem(premise: str, question: str) -> str:
    return premise.strip() + " " + question.strip()


def letter(options: Sequence[str], answer: str) -> str:
    return LETTERS[list(options).index(answer)]


def as_prompt(text: str, options: Sequence[str], answer: str, with_answer: bool) -> str:
    """text is "{premise.strip()} {question.strip()}" (BIG-bench: its input, stripped)."""
    text += "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\nAnswer:"
    return f"{text} {letter(options, answer)}\n\n" if with_answer else text


def shuffled(rows: list[tuple[str, list[str]]]) -> list[tuple[str, list[str], str]]:
    """(text, options, answer) from (text, options with the answer first), shuffled as InstructEval does."""
    rng = random.Random(0)
    out = []
    for text, options in rows:
        answer, options = options[0], list(options)
        rng.shuffle(options)
        out.append((text, options, answer))
    return out


def read_csv(path: Path) -> list[tuple[str, list[str]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        f.readline()
        for n, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.strip().split(";")
            options = [o.strip() for o in fields[4:8] if o.strip()]
            if len(fields) < 5 or len(options) < 2:
                raise BenchmarkInputError(f"{path}: line {n}: expected id;batch;premise;question;answer;option;... "
                                          f"with at least 2 options, got {len(fields)} field(s)")
            rows.append((stem(fields[2], fields[3]), options))
    return rows


def read_bigbench(path: Path) -> list[tuple[str, list[str]]]:
    examples = bigbench_examples(path)
    rows = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not (isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(scores, dict)
                and len(scores) >= 2 and sorted(scores.values()).count(1) == 1 and set(scores.values()) <= {0, 1}):
            raise BenchmarkInputError(f'{path}: example {i}: expected {{"input": str, "target_scores": '
                                      "{option: 0 or 1}} with exactly one option scored 1")
        right = next(o for o, s in scores.items() if s == 1)
        options = [o.strip() for o in [right] + [o for o in scores if o != right]][:4]
        rows.append((ex["input"].strip(), options))
    return rows


def load(path: str, options: Options) -> PrefixBenchmark:
    p = Path(path)
    if not p.is_file():
        raise BenchmarkInputError(f"{p}: not found")
    raw = read_bigbench(p) if p.suffix == ".json" else read_csv(p)
    if not raw:
        raise BenchmarkInputError(f"{p}: no CRASS questions")
    test = list(enumerate(shuffled(raw)))[:options.max_examples]
    shots = [(stem(p, q), o, a) for p, q, o, a in PAPER_SHOTS[:len(PAPER_SHOTS) if options.shots is None else options.shots]]

    def build(fits: Callable[[str], bool]) -> list[Example]:
        out = []
        for i, (text, opts, answer) in test:
            end = as_prompt(text, opts, answer, False)

            def prompt(k: int) -> str:
                return "".join(as_prompt(*s, True) for s in shots[:k]) + end

            out.append(Example("crass", i, fit_shots(prompt, len(shots), fits), letter(opts, answer)))
        return out

    return PrefixBenchmark("crass", REQUEST, build, micro_average)
