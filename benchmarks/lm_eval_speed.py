"""Examples/s of lm-eval tasks on our backend (`flacuna_jax`) and on lm-eval's HF backend, in one run.

    python -m benchmarks.lm_eval_speed [--model HF_DIR] [--examples 48] [--batch-size 8]

Same model (default: SmolLM2-135M-Instruct from benchmarks/smollm2.py; --tiny: the demo preset with
random weights and the demo SentencePiece tokenizer; fp32, CPU), same batch size,
same two tasks written here over local synthetic JSON data: `mc` (multiple choice, 4 choices,
acc/acc_norm; ~60-token questions) and `gen` (generate_until, stop at "\\n" or ".", at most 32 new
tokens). Each backend evaluates each task twice: the first run includes its compilation (XLA for us,
none for torch), the second is the steady state. Reported per task and backend: examples/s of the
backend's own request methods (loglikelihood / generate_until, the part a backend owns) and of the
whole `simple_evaluate` call, for both runs; `ratio` = ours / hf on the steady state's backend time.
Metrics of both runs are printed too (they must agree: tests/test_lm_eval.py checks that). The CPU
model and the load average before and after are recorded; above the core count the line says
`"loaded": true` (common.Load: torch's threads starve first on a busy machine, so such a ratio is
not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("river", "mountain", "seven", "blue", "paper", "window", "quiet", "garden", "engine", "winter", "bread",
         "silver", "letter", "music", "north", "forest", "coffee", "market", "yellow", "island", "candle", "stone")


def write_tasks(d: Path, n: int, seed: int = 0) -> Path:
    """Two lm-eval task YAMLs over local JSON files (no download)."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    mc = [{"question": words(int(rng.integers(25, 45))), "choices": [words(int(rng.integers(1, 4))) for _ in range(4)],
           "label": int(rng.integers(4))} for _ in range(n)]
    gen = [{"prompt": f"Continue the list: {words(int(rng.integers(8, 20)))},", "answer": str(rng.choice(WORDS))}
           for _ in range(n)]
    for name, rows in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "bench_mc.yaml").write_text("task: bench_mc\n" + common.format(d / "mc.jsonl") + """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "bench_gen.yaml").write_text("task: bench_gen\n" + common.format(d / "gen.jsonl") + """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 32
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return d


def write_tiny_with_tokenizer(d: Path) -> str:
    import dataclasses
    import shutil

    from flacuna_jax import tiny
    from flacuna_jax.demo_assets import write_demo_assets
    from flacuna_jax.tokenizer import load_tokenizer

    tok_dir = Path(write_demo_assets(str(d / "assets"), 400)["tokenizer"])
    config = dataclasses.replace(tiny.PRESETS["demo"], vocab_size=len(load_tokenizer(tok_dir)))
    model = tiny.write_tiny_model(d / "model", config, seed=0)
    for f in tok_dir.iterdir():
        shutil.copy(f, Path(model) / f.name)
    return str(model)


class RequestTimer:
    """Wraps an LM instance's request methods to add up the seconds spent in them."""

    METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")

    def __init__(self, lm):
        self.seconds = 0.0
        for name in self.METHODS:
            setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return call


def evaluate(lm, timer: RequestTimer, task: str, task_dir: Path, n: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    timer.seconds = 0.0
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=False)
    wall = time.perf_counter() - start
    metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if k.endswith(",none")}
    return {"backend_examples_per_s": round(n / timer.seconds, 2), "end_to_end_examples_per_s": round(n / wall, 2),
            "backend_s": round(timer.seconds, 2), "wall_s": round(wall, 2), "metrics": metrics}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--tiny", action="store_true",
                   help="instead: the demo preset (random, 2 layers, d 128) with the demo SentencePiece tokenizer")
    p.add_argument("--examples", type=int, default=48, help="examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=["mc", "gen"], choices=["mc", "gen"])
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import torch

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    from lm_eval.models.huggingface import HFLM

    from benchmarks.common import Load, emit
    from flacuna_jax.lm_eval import FlacunaLM

    tmp_model = tempfile.TemporaryDirectory(prefix="lm_eval_speed_model_")
    if a.model:
        model_dir = a.model
    elif a.tiny:
        model_dir = write_tiny_with_tokenizer(Path(tmp_model.name))
    else:
        from benchmarks.smollm2 import smollm2_dir

        model_dir = str(smollm2_dir())
    backends = {"hf": HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=a.batch_size),
                "ours": FlacunaLM(model=model_dir, dtype="float32", batch_size=a.batch_size)}
    timers = {name: RequestTimer(lm) for name, lm in backends.items()}
    result = {"benchmark": "lm_eval_speed", "model": "demo preset (random; --tiny)" if a.tiny and not a.model else model_dir,
              "batch_size": a.batch_size, "examples": a.examples, "dtype": "float32",
              "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads()}
    with Load() as load, tempfile.TemporaryDirectory(prefix="lm_eval_speed_") as tmp:
        task_dir = write_tasks(Path(tmp), a.examples)
        for task in a.tasks:
            runs = {}
            for name, lm in backends.items():
                first = evaluate(lm, timers[name], f"bench_{task}", task_dir, a.examples)
                second = evaluate(lm, timers[name], f"bench_{task}", task_dir, a.examples)
                runs[name] = {"first_run": first, "steady": second}
            runs["ratio"] = round(runs["ours"]["steady"]["backend_examples_per_s"]
                                  / runs["hf"]["steady"]["backend_examples_per_s"], 2)
            runs["ratio_first_run"] = round(runs["ours"]["first_run"]["backend_examples_per_s"]
                                            / runs["hf"]["first_run"]["backend_examples_per_s"], 2)
            result[task] = runs
    tmp_model.cleanup()
    result.update(load.fields())
    result["meets_target"] = all(result[t]["ratio"] >= 2.0 for t in a.tasks)
    return emit(result)


if __name__ == "__main__":
    main()
