"""The contract between a benchmark and the runner (`flacuna_jax.evals.runner`).

A benchmark module (mmlu, bbh, drop, crass, hhh, humaneval, impact) exposes one function

    load(path: str, options: Options) -> Benchmark

(impact's also takes the judge that reviews its answers, `judge=`, and `prompt_style=`)

that reads the benchmark's published files (raising `BenchmarkInputError` with a one-line message
naming the file and line/record) and returns a `Benchmark`. The runner then does, per benchmark:

    examples = bench.examples(fits)          # prompts built, shots dropped while not fits(prompt)
    outputs  = <model>(examples, bench.request)   # batched, one list per example
    scored   = bench.score(examples, outputs)     # one `Scored` per example, in the same order
    result   = bench.aggregate(scored)            # the benchmark's number as the paper computes it

Requests. `bench.request` says what the model must produce for each example:

- `Generate(max_new_tokens, temperature=0.0, samples=1, max_input_tokens=2048)`: the runner feeds
  `example.prompt` raw (no chat template; BOS only if the tokenizer adds one), decodes up to
  `max_new_tokens` (greedy at temperature 0, else temperature sampling, `samples` completions per
  example with distinct seeds) and passes, per example, the list of `samples` completion texts
  (new tokens only, `tokenizer.decode(..., skip_special_tokens=True)`, as InstructEval decodes).
- `NextTokenLogits(tokens)`: the runner runs `(example.prompt,) + example.extra_prompts` and passes,
  per example, one list per prompt with the raw next-token logit (last position) of each text in
  `tokens`, each text's first id under `tokenizer(text, add_special_tokens=False)` (InstructEval's
  `get_choice`; HHH).

`fits(prompt) -> bool` is the runner's length rule: the prompt's token count (tokenizer's own
special tokens included) is at most min(request.max_input_tokens, the model's context), which is
InstructEval's `check_valid_length` for a 2048-context LLaMA. Benchmarks drop shots from the end
while a prompt does not fit, as InstructEval does; `options.shots` overrides their shot count.
`options.max_examples` keeps the first N scored examples of every task, in file order; the
benchmark applies it when it builds examples (so no prompt is built for a skipped example).

Scoring. `score(examples, outputs)` gets the whole benchmark at once (HumanEval executes its
programs in parallel in a sandbox); a prefix-rule benchmark uses `prefix_correct`. `Scored.output`
is what goes to preds.jsonl ("the completion that was executed" for HumanEval, the first sample's
when several), `Scored.correct` a bool or a fraction (HHH: mean over both slot orders; HumanEval:
the problem's unbiased pass@1 estimate c/n), `Scored.detail` anything else the aggregate needs
(HumanEval: {"n": samples, "c": passed}; `detail["pred_fields"]` adds fields to its preds.jsonl line).
`aggregate(scored) -> Result`; `micro_average` and `mean_over_tasks` are the two InstructEval
aggregates. A benchmark may also have `summary(scored) -> dict`, extra keys for its results.json entry
(IMPACT: both averages, the judge).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, Union


class BenchmarkInputError(ValueError):
    """Malformed benchmark input; the message names the file and line/record."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the CLI sets for every benchmark."""

    shots: int | None = None  # None: InstructEval's shots for the benchmark
    max_examples: int | None = None  # first N scored examples of every task
    temperature: float = 0.0  # sampling benchmarks (HumanEval); 0 = greedy
    samples: int = 1  # completions per example (HumanEval pass@k)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Example:
    task: str  # MMLU subject, BBH file stem, HHH category, or the benchmark name
    id: int | str  # 0-based position in its task file (HumanEval: task_id)
    prompt: str  # the exact string given to the model
    label: str  # the reference the output is checked against
    extra_prompts: tuple[str, ...] = ()  # NextTokenLogits: more prompts scored with this example
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # benchmark-specific (e.g. a HumanEval problem)


@dataclasses.dataclass(frozen=True)
class Generate:
    max_new_tokens: int
    temperature: float = 0.0
    samples: int = 1
    max_input_tokens: int = 2048  # InstructEval's max_input_length


@dataclasses.dataclass(frozen=True)
class NextTokenLogits:
    tokens: tuple[str, ...]  # e.g. ("A", "B")
    max_input_tokens: int = 1024


Request = Union[Generate, NextTokenLogits]


@dataclasses.dataclass(frozen=True)
class Scored:
    example: Example
    output: str
    correct: float  # bool or a fraction in [0, 1]
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    score: float
    n: int


@dataclasses.dataclass(frozen=True)
class Result:
    score: float  # the benchmark's aggregate, a fraction in [0, 1]
    n: int  # scored examples
    tasks: Mapping[str, TaskResult]


class Benchmark(Protocol):
    name: str
    request: Request

    def examples(self, fits: Callable[[str], bool]) -> list[Example]: ...

    def score(self, examples: Sequence[Example], outputs: Sequence[Sequence[Any]]) -> list[Scored]: ...

    def aggregate(self, scored: Sequence[Scored]) -> Result: ...


def prefix_correct(output: str, label: str) -> bool:
    """InstructEval's rule for every generated answer: `output.strip().startswith(label)`."""
    return output.strip().startswith(label)


def by_task(scored: Sequence[Scored]) -> dict[str, list[Scored]]:
    """Scored examples grouped by task, tasks in first-seen order."""
    groups: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        groups[s.example.task].append(s)
    return dict(groups)


def _tasks(scored: Sequence[Scored]) -> dict[str, TaskResult]:
    return {t: TaskResult(sum(float(s.correct) for s in group) / len(group), len(group))
            for t, group in by_task(scored).items()}


def micro_average(scored: Sequence[Scored]) -> Result:
    """Mean over all examples (MMLU's "weighted" accuracy; single-task benchmarks)."""
    if not scored:
        raise BenchmarkInputError("no examples were scored")
    return Result(sum(float(s.correct) for s in scored) / len(scored), len(scored), _tasks(scored))


def mean_over_tasks(scored: Sequence[Scored]) -> Result:
    """Unweighted mean of the per-task scores (BBH over its task files, HHH over its categories)."""
    if not scored:
        raise BenchmarkInputError("no examples were scored")
    tasks = _tasks(scored)
    return Result(sum(t.score for t in tasks.values()) / len(tasks), len(scored), tasks)


@dataclasses.dataclass
class PrefixBenchmark:
    """A generated-answer benchmark scored by `prefix_correct` (MMLU, BBH, DROP, CRASS).

    build(fits) makes the examples; aggregate is `micro_average` or `mean_over_tasks`.
    """

    name: str
    request: Request
    build: Callable[[Callable[[str], bool]], list[Example]]
    aggregate_fn: Callable[[Sequence[Scored]], Result] = micro_average

    def examples(self, fits: Callable[[str], bool]) -> list[Example]:
        return self.build(fits)

    def score(self, examples: Sequence[Example], outputs: Sequence[Sequence[str]]) -> list[Scored]:
        return [Scored(ex, out[0], prefix_correct(out[0], ex.label)) for ex, out in zip(examples, outputs)]

    def aggregate(self, scored: Sequence[Scored]) -> Result:
        return self.aggregate_fn(scored)


def fit_shots(build: Callable[[int], str], k: int, fits: Callable[[str], bool]) -> str:
    """build(k) with k lowered one by one while the prompt does not fit (never below 0 shots)."""
    prompt = build(k)
    while not fits(prompt) and k > 0:
        k -= 1
        prompt = build(k)
    return prompt


def bigbench_examples(path: Path) -> list[Any]:
    """The `examples` list of a BIG-bench `task.json` (CRASS's crass_ai, HHH's categories)."""
    try:
        examples = json.loads(path.read_text(encoding="utf-8")).get("examples")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise BenchmarkInputError(f"{path}: not a BIG-bench task.json ({e})") from None
    if not isinstance(examples, list):
        raise BenchmarkInputError(f'{path}: expected {{"examples": [...]}}')
    return examples
