"""HumanEval as InstructEval (declare-lab/instruct-eval at e2eb966, `human_eval/main.py`) runs it.

Public functions (stable; the runner and the CLI use them):

    read_problems(path) -> list[Problem]        HumanEval.jsonl[.gz], file order; FILE:LINE errors
    build_prompt(problem_prompt) -> str         INSTRUCTION + the problem's prompt, fed raw
    fix_indents(text, multiple=2) -> str        InstructEval's indentation repair
    filter_code(text) -> str                    the first block: text.lstrip("\\n").split("\\n\\n")[0]
    postprocess(generated) -> str               filter_code(fix_indents(generated)): what is executed
    completion_is_final(generated) -> bool      True once more tokens cannot change `postprocess`
    build_program(problem, completion) -> str   prompt + completion + "\\n" + test + "\\n" + check(entry_point)
    execute(problems, completions, ...)         the programs, in the sandbox, a few at a time -> Outcomes
    pass_at_k(n, c, k) -> float                 the unbiased estimator of Chen et al. (2021)
    load(path, options) -> HumanEvalBenchmark   the `flacuna_jax.evals.benchmark` contract

The protocol, read from InstructEval's code (none of it copied):

- Prompt: "Please complete the following Python code without providing any additional tasks such as
  testing or explanations\\n" + the problem's `prompt`, no chat template (the starcoder/starchat/chatglm
  branches there key on the model's path and are not LLaMA's).
- Generation: at most 512 new tokens (`max_output_length`), stopping at EOS; decoded new tokens only,
  special tokens skipped. InstructEval's prompt-length limit (1360) is never checked for HumanEval.
- Post-processing: `fix_indents` (each line's leading spaces padded up to a multiple of 2), then
  `filter_code` (leading newlines dropped, everything from the first blank line on cut: "the program
  tends to overwrite, we only take the first function").
- Execution: the program above, 3 s per program, passed iff it runs to its end without raising.
  InstructEval runs it in a forked process under `reliability_guard`; we run it in `sandbox`.
- pass@k: n samples per problem, c of them passed, the mean over problems of 1 - C(n-c, k)/C(n, k).
  InstructEval picks the temperature from the number of samples ({1: 0.1, 10: 0.6, 100: 0.8}) and
  always samples, so even its pass@1 with one sample is sampled at temperature 0.1; here greedy is the
  default (deterministic) and `temperature=0.1, samples=N` is that sampled setting.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Sequence

from flacuna_jax.evals import sandbox

INSTRUCTION = ("Please complete the following Python code without providing any additional tasks such as "
               "testing or explanations\n")
MAX_NEW_TOKENS = 512  # InstructEval's max_output_length
TIMEOUT = 3.0  # seconds per program, InstructEval's default
SAMPLED_TEMPERATURE = {1: 0.1, 10: 0.6, 100: 0.8}  # InstructEval's temperature per number of samples
REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


class HumanEvalInputError(ValueError):
    """A malformed HumanEval file; the message names FILE:LINE and the key."""


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


# ------------------------------------------------------------------------------ reading

def read_problems(path: str | Path, error: type[Exception] = HumanEvalInputError) -> list[Problem]:
    """The problems of a `HumanEval.jsonl` or `.jsonl.gz`, in file order (blank lines skipped).

    Every problem needs string `task_id`, `prompt`, `test` and `entry_point` (`canonical_solution` is
    optional); task ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
    problems, seen = [], {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise error(f"{where}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise error(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in REQUIRED_KEYS + ("canonical_solution",):
            if key not in rec and key != "canonical_solution":
                raise error(f"{where}: missing key {key!r}")
            if not isinstance(rec.get(key, ""), str):
                raise error(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
        if rec["task_id"] in seen:
            raise error(f"{where}: task_id {rec['task_id']!r} already on line {seen[rec['task_id']]}")
        seen[rec["task_id"]] = lineno
        problems.append(Problem(rec["task_id"], rec["prompt"], rec["test"], rec["entry_point"],
                                rec.get("canonical_solution", "")))
    if not problems:
        raise error(f"{path}: no problems")
    return problems


# ------------------------------------------------------------------------------ prompt and completion

def build_prompt(problem_prompt: str) -> str:
    """The exact text InstructEval gives a LLaMA-family model."""
    return INSTRUCTION + problem_prompt


def fix_indents(text: str, multiple: int = 2) -> str:
    """Each line's run of leading spaces padded (with spaces in front) up to a multiple of `multiple`."""
    lines = []
    for line in text.split("\n"):
        spaces = len(line) - len(line.lstrip(" "))
        lines.append(" " * (-spaces % multiple) + line)
    return "\n".join(lines)


def filter_code(text: str) -> str:
    """The first block of the completion: leading newlines dropped, cut at the first blank line."""
    return text.lstrip("\n").split("\n\n")[0]


def postprocess(generated: str) -> str:
    """The decoded generation -> the completion that is executed (fix_indents, then filter_code)."""
    return filter_code(fix_indents(generated))


def completion_is_final(generated: str) -> bool:
    """True once any continuation of `generated` has the same `postprocess` (a blank line after the code).

    `fix_indents` only adds spaces in front of lines, so a "\\n\\n" is one before and after it; once the
    text (leading newlines aside) holds one, `filter_code` cuts there. A runner may stop decoding an
    example here without changing its completion.
    """
    return "\n\n" in generated.lstrip("\n")


def build_program(problem: Problem, completion: str) -> str:
    """The program InstructEval executes for one completion."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})"


# ------------------------------------------------------------------------------ execution and pass@k

def execute(problems: Sequence[Problem], completions: Sequence[str], limits: sandbox.Limits | None = None,
            workers: int = 4) -> list[sandbox.Outcome]:
    """The program of each (problem, completion) pair run in the sandbox, `workers` at a time."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    limits = limits or sandbox.Limits(timeout=TIMEOUT)
    return sandbox.run_programs([build_program(p, c) for p, c in zip(problems, completions)], limits, workers)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total  # one rounding (ints divide exactly-rounded): pass@1 == c / n


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k of a benchmark: the mean over problems of `pass_at_k(n, c, k)` for (n, c) per problem."""
    if not counts:
        raise ValueError("no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
