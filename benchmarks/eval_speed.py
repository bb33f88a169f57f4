"""Evaluation throughput: our batched suite vs InstructEval's one-prompt-at-a-time transformers loop.

    python -m benchmarks.eval_speed [--model HF_DIR] [--mmlu 16] [--bbh 16] [--batch-size 8] [--threads 2]

Prints one JSON line. Both sides answer the same prompts on the same weights (default: the real
SmolLM2-135M-Instruct, `benchmarks/smollm2.py`), CPU, fp32, in this one process, one after the other:
an MMLU-format subject (5-shot prompts, 2 new tokens) and a BBH-format task (3-shot, 32 new tokens),
written to a temporary dir from fixed synthetic questions. The reference is what InstructEval's model
class does per example: `tokenizer(prompt)`, `model.generate(max_new_tokens, greedy)`, decode the new
tokens. Ours is `flacuna_jax.evals.runner.Runner` (a task's prompts batched together, their shared
header and shots prefilled once, the rest left-padded through the KV-cache decoder). examples/s for
ours is reported cold (including XLA compiles) and warm (a second pass on the same shapes); the ratio
(target >= 3x) is warm ours / reference, and `agree` counts the examples whose outputs are identical.
Ours loads the model as the eval CLI does (`layers="unrolled"`). The CPU model and the load average
before and after are recorded; above the core count the line says `"loaded": true` (common.Load).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

WORDS = ("river", "stone", "maple", "cloud", "ember", "harbor", "violet", "copper", "meadow", "falcon")


def write_suite(root: Path, n_mmlu: int, n_bbh: int) -> dict[str, str]:
    """Synthetic files in the published layouts: questions with a right answer a small model can find."""
    import csv

    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "test").mkdir()
    rows = []
    for i in range(5 + n_mmlu):
        a, b = 3 + i % 7, 2 + (i * 3) % 5
        options = [a + b, a + b + 1, a * b + 2, a + b - 1]
        shift = i % 4
        options = options[shift:] + options[:shift]
        rows.append([f"What is {a} plus {b}?", *options, "ABCD"[options.index(a + b)]])
    for split, part in (("dev", rows[:5]), ("test", rows[5:])):
        with open(root / "mmlu" / split / f"elementary_mathematics_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(part)
    (root / "bbh").mkdir()
    examples = []
    for i in range(3 + n_bbh):
        items = [WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4)]
        examples.append({"input": "Sort the following words alphabetically: List: " + " ".join(items),
                         "target": " ".join(sorted(items))})
    (root / "bbh" / "word_sorting.json").write_text(json.dumps({"examples": examples}))
    return {"mmlu": str(root / "mmlu"), "bbh": str(root / "bbh")}


def reference_loop(model_dir: str, prompts: list[tuple[str, int]], threads: int) -> tuple[list[str], float]:
    """InstructEval's per-example transformers calls; (outputs, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt, max_new in prompts:
            inputs = tok(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
            outputs.append(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    return outputs, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--mmlu", type=int, default=16, help="MMLU-format questions")
    p.add_argument("--bbh", type=int, default=16, help="BBH-format questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    a = p.parse_args(argv)

    import io

    import jax

    from benchmarks.common import Load, emit
    from flacuna_jax.evals import load_benchmark
    from flacuna_jax.evals.benchmark import Generate, Options
    from flacuna_jax.evals.runner import Runner
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.tokenizer import load_tokenizer

    if a.model is None:
        from benchmarks.smollm2 import smollm2_dir

        a.model = str(smollm2_dir())
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_suite(Path(tmp), a.mmlu, a.bbh)
        benches = [load_benchmark(name, path, Options()) for name, path in paths.items()]
        tokenizer = load_tokenizer(a.model)
        model, params = load_for_inference(a.model, layers="unrolled")
        runner = Runner(model, params, tokenizer, a.batch_size, progress_out=io.StringIO())
        work = [(b, b.examples(runner.fits_for(b.request))) for b in benches]
        n = sum(len(ex) for _, ex in work)

        def ours() -> tuple[list[str], float]:
            start, outs = time.perf_counter(), []
            for bench, examples in work:
                outs += [o[0] for o in runner.generate([e.prompt for e in examples], bench.request)]
            return outs, time.perf_counter() - start

        with Load() as load:
            _, cold = ours()
            outputs, warm = ours()
            prompts = [(e.prompt, b.request.max_new_tokens) for b, ex in work for e in ex]
            reference, ref_s = reference_loop(a.model, prompts, a.threads)
    assert all(isinstance(b.request, Generate) for b, _ in work)
    ratio = (n / warm) / (n / ref_s)
    return emit({
        "benchmark": "eval_speed", "model": a.model, "examples": n, "batch_size": a.batch_size,
        "device": jax.devices()[0].device_kind, "ours_cold_examples_per_s": round(n / cold, 3),
        "ours_warm_examples_per_s": round(n / warm, 3), "reference_examples_per_s": round(n / ref_s, 3),
        "ratio": round(ratio, 2), "meets_target": ratio >= 3.0,
        "agree": sum(x == y for x, y in zip(outputs, reference)), "prompt_tokens_mean": round(
            sum(len(tokenizer(p)["input_ids"]) for p, _ in prompts) / n, 1), **load.fields()})


if __name__ == "__main__":
    main()
