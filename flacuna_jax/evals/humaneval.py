"""HumanEval as InstructEval (declare-lab/instruct-eval at e2eb966, `human_eval/main.py`) runs it.

Public functions (stable; the runner and the CLI use them):

    read_problems(path) -> list[Problem]        HumanEval.jsonl[.gz], file order; FILE:LINE errors
    build_prompt(problem_prompt) -> str         INSTRUCTION + the problem's prompt, fed raw
    fix_indents(text, multiple=2) -> str        InstructEval's indentation repair
    filter_code(text) -> str                    the first block: text.lstrip("\\n").split("\\n\\n")[0]
    postprocess(generated) -> str               filter_code(fix_indents(generated)): what is executed
    completion_is_final(generated) -> bool      True once more tokens cannot change `postprocess`
    stop_table(tokenizer) -> int8 [vocab, 5]    the same, token by token, for a decoder's loop
    build_program(problem, completion) -> str   prompt + completion + "\\n" + test + "\\n" + check(entry_point)
    execute(problems, completions, ...)         the programs, in the sandbox, a few at a time -> Outcomes
    pass_at_k(n, c, k) -> float                 the unbiased estimator of Chen et al. (2021)
    mean_pass_at_k(counts, k), pass_at_ks(scored)  a benchmark's pass@k from (n, c) per problem
    load(path, options) -> HumanEvalBenchmark   the `flacuna_jax.evals.benchmark` contract: one task
                                                "humaneval", ids = task_ids, score = pass@1

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
  default (deterministic) and `temperature=0.1, samples=N` is that sampled setting (transformers also
  applied its default top-k of 50 there, which at temperature 0.1 removes next to no probability).

What differs in execution, knowingly: InstructEval's `reliability_guard` sets functions such as
`os.remove`, `os.getcwd`, `shutil.rmtree` and `subprocess.Popen` to None, so a completion calling
them fails there; here they work inside the sandbox's own directory. Its 3 s alarm covers `exec` only,
as our clock does (`sandbox` starts it when the program is about to run).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from flacuna_jax.evals import sandbox
from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, Result, Scored,
                                         micro_average)
from flacuna_jax.jsonl import read_objects

INSTRUCTION = ("Please complete the following Python code without providing any additional tasks such as "
               "testing or explanations\n")
MAX_NEW_TOKENS = 512  # InstructEval's max_output_length
TIMEOUT = 3.0  # seconds per program, InstructEval's default
PROMPT_LIMIT = 1360  # InstructEval's max_input_length for HumanEval (which it never checks)
REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


# ------------------------------------------------------------------------------ reading

def read_problems(path: str | Path, error: type[Exception] = BenchmarkInputError) -> list[Problem]:
    """The problems of a `HumanEval.jsonl` or `.jsonl.gz`, in file order (blank lines skipped).

    Every problem needs string `task_id`, `prompt`, `test` and `entry_point` (`canonical_solution` is
    optional); task ids must be unique.
    """
    problems, seen = [], {}
    for where, rec in read_objects(path, error):
        lineno = int(where.rpartition(":")[2])
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


# States of the blank-line automaton (`completion_is_final` token by token, for a decoder's loop):
# nothing decoded yet, only newlines so far, inside a line, just after a newline, a blank line seen.
START, LEADING, IN_LINE, AT_NEWLINE, FINAL = range(5)


def _advance(state: int, text: str) -> int:
    for ch in text:
        if state == FINAL:
            break
        state = IN_LINE if ch != "\n" else {LEADING: LEADING, IN_LINE: AT_NEWLINE, AT_NEWLINE: FINAL}[state]
    return state


def stop_table(tokenizer) -> np.ndarray:
    """int8 [len(tokenizer), 5]: table[token, state] = the state after that token.

    A decoder that starts every row at START and steps `state = table[token, state]` reaches FINAL
    exactly when `completion_is_final(tokenizer.decode(row, skip_special_tokens=True))` becomes true,
    so it may stop the row there without changing the executed completion (the tokens before are the
    same, greedy or sampled). A token's text is how it decodes after an ordinary token; the first one
    that decodes to anything is taken as it decodes alone (a SentencePiece decoder drops the text's
    leading space: "▁" alone is "", after a letter " ").
    """
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    prefix = len(tokenizer.decode(anchor, skip_special_tokens=True))
    ids = range(len(tokenizer))
    after = [t[prefix:] for t in tokenizer.batch_decode([anchor + [i] for i in ids], skip_special_tokens=True)]
    alone = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    table = np.empty((len(ids), 5), np.int8)
    for i in ids:
        table[i, START] = START if after[i] == "" else _advance(LEADING, alone[i])
        table[i, LEADING:] = [_advance(s, after[i]) for s in range(LEADING, FINAL + 1)]
    return table


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


# ------------------------------------------------------------------------------ the benchmark contract

@dataclasses.dataclass
class HumanEvalBenchmark:
    """HumanEval for the runner: `examples` -> prompts, `score` executes, `aggregate` is pass@1.

    `score` gets, per example, the `request.samples` decoded generations; each is post-processed,
    executed, and the example's `correct` is c / n (its unbiased pass@1), with detail {"n", "c",
    "results"} (InstructEval's result string per sample). `Scored.output` is the first sample's
    completion, the text that was executed. `stop_when` (= `completion_is_final`) tells a runner
    when it may stop decoding an example early without changing its completion.
    """

    problems: list[Problem]
    request: Generate
    limits: sandbox.Limits = dataclasses.field(default_factory=lambda: sandbox.Limits(timeout=TIMEOUT))
    workers: int = 4
    name: str = "humaneval"
    stop_when = staticmethod(completion_is_final)

    def examples(self, fits=None) -> list[Example]:
        """One per problem, in file order. `fits` is not consulted: InstructEval never shortens or
        checks a HumanEval prompt (the longest is ~600 LLaMA tokens)."""
        return [Example(self.name, p.task_id, build_prompt(p.prompt), p.canonical_solution, meta={"problem": p})
                for p in self.problems]

    def score(self, examples: Sequence[Example], outputs: Sequence[Sequence[str]]) -> list[Scored]:
        if len(examples) != len(outputs) or any(len(o) == 0 for o in outputs):
            raise ValueError("need one non-empty list of generations per example")
        completions = [[postprocess(text) for text in generations] for generations in outputs]
        flat = [(ex.meta["problem"], c) for ex, cs in zip(examples, completions) for c in cs]
        outcomes = iter(execute([p for p, _ in flat], [c for _, c in flat], self.limits, self.workers))
        scored = []
        for ex, cs in zip(examples, completions):
            results = [next(outcomes) for _ in cs]
            c = sum(o.passed for o in results)
            scored.append(Scored(ex, cs[0], c / len(cs), {"n": len(cs), "c": c, "results": [o.result for o in results]}))
        return scored

    def aggregate(self, scored: Sequence[Scored]) -> Result:
        """pass@1: the mean over problems of c / n (InstructEval's `pass@1`)."""
        return micro_average(scored)


def pass_at_ks(scored: Sequence[Scored], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """{"pass@k": value} for each k that every problem has enough samples for (as human-eval reports)."""
    counts = [(s.detail["n"], s.detail["c"]) for s in scored]
    return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks if counts and all(n >= k for n, _ in counts)}


def load(path: str | Path, options: Options = Options()) -> HumanEvalBenchmark:
    """The benchmark of `HumanEval.jsonl[.gz]` at `path`: greedy by default; `options.temperature` and
    `options.samples` for the sampled setting (the paper's: temperature 0.1); `options.max_examples`
    keeps the first N problems. HumanEval has no shots (`options.shots` does not apply)."""
    if options.samples < 1 or options.temperature < 0:
        raise ValueError(f"need samples >= 1 and temperature >= 0, got {options.samples} and {options.temperature}")
    if options.samples > 1 and options.temperature == 0:
        raise ValueError("several samples of greedy decoding are all the same: give a temperature > 0")
    problems = read_problems(path)
    if options.max_examples is not None:
        problems = problems[:options.max_examples]
    return HumanEvalBenchmark(problems, Generate(MAX_NEW_TOKENS, options.temperature, options.samples,
                                                 max_input_tokens=PROMPT_LIMIT))
