"""InstructEval's benchmarks on their published files (see `benchmark` for the contract).

`BENCHMARKS` maps a `--benchmark NAME=PATH` name to the module whose `load(path, options)` reads it
(`impact`, the writing evaluation, also takes its judge: `load(path, options, judge=..., prompt_style=...)`).
"""

from __future__ import annotations

import importlib

BENCHMARKS = ("mmlu", "bbh", "drop", "crass", "humaneval", "hhh", "impact")


def load_benchmark(name: str, path: str, options, **extra):
    """The `Benchmark` of `name` read from `path` (flacuna_jax.evals.<name>.load; `extra` goes to it)."""
    from flacuna_jax.evals.benchmark import BenchmarkInputError

    if name not in BENCHMARKS:
        raise BenchmarkInputError(f"unknown benchmark {name!r} (one of {', '.join(BENCHMARKS)})")
    return importlib.import_module(f"flacuna_jax.evals.{name}").load(path, options, **extra)
