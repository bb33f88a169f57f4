"""BIG-Bench Hard (suzgun et al.) as InstructEval's bbh.py at e2eb966 evaluates it.

Files: `DIR/<task>.json`, each {"examples": [{"input": str, "target": str}, ...]} (the repository's
`bbh/` directory; InstructEval reads the same rows from the hub's lukaemon/bbh, whose 27 configs
are these 27 files). Tasks in sorted order.

Per task, the first 3 examples are the shots and the rest are scored:

    for each shot "{input}\\nAnswer: {target}\\n\\n"  +  "{input}\\nAnswer:"

shots dropped from the end while the prompt is longer than 2048 tokens; greedy decoding of 32 new
tokens; correct when output.strip().startswith(target). The score is the mean over tasks of each
task's accuracy. `id` is the example's position in its file (the first scored one is 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, PrefixBenchmark,
                                         fit_shots, mean_over_tasks)

SHOTS = 3
REQUEST = Generate(max_new_tokens=32, max_input_tokens=2048)


def format_example(inp: str, target: str | None) -> str:
    return f"{inp}\nAnswer:" + ("" if target is None else f" {target}\n\n")


def read_task(path: Path) -> list[tuple[str, str]]:
    """(input, target) pairs of one task file, in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkInputError(f"{path}: not valid JSON ({e})") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise BenchmarkInputError(f'{path}: expected {{"examples": [{{"input", "target"}}, ...]}}')
    out = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(ex.get("target"), str)):
            raise BenchmarkInputError(f'{path}: example {i}: expected {{"input": str, "target": str}}')
        out.append((ex["input"], ex["target"]))
    return out


def load(path: str, options: Options) -> PrefixBenchmark:
    root = Path(path)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise BenchmarkInputError(f"{root}: no <task>.json files")
    shots = SHOTS if options.shots is None else options.shots
    tasks = []
    for f in files:
        rows = read_task(f)
        scored = list(enumerate(rows))[shots:]
        if options.max_examples is not None:
            scored = scored[:options.max_examples]
        if not scored:
            raise BenchmarkInputError(f"{f}: {len(rows)} examples, none left to score after {shots} shots")
        tasks.append((f.stem, rows[:shots], scored))

    def build(fits: Callable[[str], bool]) -> list[Example]:
        out = []
        for task, train, scored in tasks:
            for i, (inp, target) in scored:
                end = format_example(inp, None)

                def prompt(k: int) -> str:
                    return "".join(format_example(x, t) for x, t in train[:k]) + end

                out.append(Example(task, i, fit_shots(prompt, len(train), fits), target))
        return out

    return PrefixBenchmark("bbh", REQUEST, build, mean_over_tasks)
