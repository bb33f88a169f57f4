"""Every benchmark, each in its own process (fresh XLA flags and devices), then a summary table.

    python -m benchmarks.run_all [--only packing mfu ...] [--quick]          (make bench)

Each benchmark prints one JSON line; run_all prints each again as it finishes, then a table: the key
number, its target and the verdict (met / NOT met / n/a where the target is for other hardware /
skipped / FAILED TO RUN). A benchmark that fails to run (non-zero exit, no JSON line, timeout) is
reported and the rest still run; the exit code is 1 if any failed to run (a missed target is a
result, not a failure). --quick: small shapes and few steps (a couple of minutes on 2 CPU cores;
rough numbers). XLA_FLAGS pass through to the benchmarks except a fake CPU device count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.common import BenchError, emit, run_json

Verdict = Callable[[dict], tuple[str, str]]  # result -> (the key number as text, met | NOT met | n/a: why)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _mfu_verdict(r: dict) -> tuple[str, str]:
    ratio = r.get("ratio")
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else f"no spec peak ({r['matmul_utilisation']:.1%} of a measured matmul)"
    value = f"{mfu}; " + (f"{ratio:.2f}x" if ratio is not None else "torch: " + str(
        r["torch_peft"].get("skipped") or r["torch_peft"].get("error")))
    if not (r["seven_b"] and "H100" in r["device"]):
        return value, f"n/a ({r['device']}, not the 7B shape on an H100)"
    return value, _met(r["mfu"] >= 0.55 and ratio is not None and ratio >= 1.5)


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    metric: str
    target: str
    verdict: Verdict


BENCHES = [
    Bench("parity", (), (), "max |delta| vs transformers logits; PEFT logits, factor grads (rel)", "<= 1e-4",
          lambda r: (f"{r['logits_worst']:.1e}; {r['peft_worst']['logits']:.1e}, {r['peft_worst']['grad_rel']:.1e}",
                     _met(max(r["logits_worst"], *r["peft_worst"].values()) <= r["tolerance"]))),
    Bench("packing", (), ("--seq-len", "512", "--rows", "4", "--steps", "2"),
          "packed / padded trained tokens/s", ">= 3x",
          lambda r: (f"{r['ratio']:.2f}x ({r['packed']['trained_per_slot']:.0%} vs "
                     f"{r['padded']['trained_per_slot']:.0%} of slots trained)", _met(r["meets_target"]))),
    Bench("loader", (), ("--seconds", "2"), "pipeline tokens/s per host", ">= 100K",
          lambda r: (f"{r['tokens_per_s']:,}", _met(r["tokens_per_s"] >= 100_000))),
    Bench("step_vs_torch", (), ("--steps", "1", "--repeats", "2", "--layers", "2"),
          "ours / torch+peft train tokens/s (CPU fp32)", ">= 1.0x",
          lambda r: (f"{r['ratio']:.2f}x", _met(r["ratio"] >= 1.0))),
    Bench("decode", (), ("--tiny", "--new-tokens", "16", "--repeats", "1"),
          "decode tokens/s, ours / transformers generate, batch 1; 16", ">= 1.5x",
          lambda r: (f"{r['batch1']['ratio']:.2f}x; {r['batch16']['ratio']:.2f}x", _met(r["meets_target"]))),
    Bench("lm_eval_speed", (), ("--tiny", "--examples", "16"), "lm-eval examples/s, ours / --model hf (mc; gen), batch 8",
          ">= 2x", lambda r: (f"{r['mc']['ratio']:.2f}x; {r['gen']['ratio']:.2f}x", _met(r["meets_target"]))),
    Bench("eval_speed", (), ("--mmlu", "4", "--bbh", "4"),
          "evaluation examples/s, ours / InstructEval's loop (SmolLM2, CPU)", ">= 3x",
          lambda r: (f"{r['ratio']:.2f}x ({r['agree']}/{r['examples']} outputs equal)", _met(r["meets_target"]))),
    Bench("impact_judge", (), ("--prompts", "20", "--stub-latency", "0.05"),
          "IMPACT judging wall time, 8 requests in flight / 1 (stub judge, fixed latency per request)", "(reported)",
          lambda r: (f"{r['ratio']:.2f}x ({r['serial_s']:.1f} s -> {r['concurrent_s']:.1f} s, {r['requests']} requests)", "-")),
    Bench("plan_13b", (), (), "13B LoRA memory per device, 4 devices", "<= 20 GB",
          lambda r: (f"{r['per_device_gb']:.2f} GB", _met(r["meets_target"]))),
    Bench("plan_qlora", (), (), "QLoRA (NF4) memory, one device: 13B / 7B", "<= 12 / 7 GB",
          lambda r: (f"{r['llama_13b']['per_device_gb']:.2f} / {r['llama_7b']['per_device_gb']:.2f} GB",
                     _met(r["meets_target"]))),
    Bench("qlora", (), ("--seq", "128", "--steps", "1"), "NF4 / bf16 base LoRA train tokens/s (CPU fp32)",
          "(reported)", lambda r: (f"{r['nf4_train_ratio']:.2f}x ({r['nf4']['train_tokens_per_s']:,.0f} vs "
                                   f"{r['bf16']['train_tokens_per_s']:,.0f})", "-")),
    Bench("serve", (), ("--requests", "4", "--requests-at-1", "2", "--clients", "1", "4", "--max-batch", "4",
                         "--prompt-range", "16", "64", "--max-tokens-range", "8", "16", "--out", ""),
          "server output tokens/s at 32 clients: ours / transformers serve --continuous-batching; / static; 4 adapters / base",
          ">= 3x; >= 1.5x; >= 0.8x",
          lambda r: (f"{r['ours_vs_transformers']}x; {r['continuous_vs_static']}x; {r['adapters_vs_base']}x",
                     _met(all(v for v in r["meets_target"].values())))),
    Bench("splash", (), ("--seq", "300", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--repeats", "1"),
          "splash vs XLA attention, packed rows: fp32 rel error; bf16 error / XLA's (TPU: fwd+bwd speedup)",
          "<= 1e-5; <= 2x", lambda r: (f"{max(r['fp32_rel'].values()):.1e}; {max(r['bf16_ratio'].values()):.2f}x"
                                       + (f"; {r['speedup_vs_xla']:.2f}x faster" if "speedup_vs_xla" in r
                                          else " (interpreted: no time)"), _met(r["parity_ok"]))),
    Bench("mfu", (), ("--layers", "2", "--hidden", "256", "--heads", "4", "--intermediate", "688", "--vocab", "1024",
                      "--seq", "256", "--batch", "2", "--warmup", "1", "--steps", "2", "--repeats", "1"),
          "7B LoRA MFU; ours / torch+peft tokens/s", ">= 55%; >= 1.5x (H100)", _mfu_verdict),
]


def run_one(bench: Bench, quick: bool) -> dict:
    try:
        return run_json(["-m", f"benchmarks.{bench.name}", *(bench.quick_args if quick else bench.args)],
                        timeout=600 if quick else 3600)
    except BenchError as e:
        return {"benchmark": bench.name, "error": str(e)}


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def summary(results: list[tuple[Bench, dict, float]]) -> str:
    rows = [("benchmark", "metric", "value", "target", "result", "time")]
    for bench, r, secs in results:
        if "error" in r:
            value, verdict = "-", "FAILED TO RUN"
        elif "skipped" in r:
            value, verdict = "-", "skipped: " + r["skipped"].split(":")[0]
        else:
            try:
                value, verdict = bench.verdict(r)
            except (KeyError, TypeError, ValueError) as e:
                value, verdict = "-", f"unreadable result ({type(e).__name__}: {e})"
            if r.get("loaded"):  # a ratio against torch on a busy machine measures the machine (common.Load)
                verdict = f"LOADED (load {max(r['load_before'][0], r['load_after'][0]):.1f} > {r['cpus']} CPUs): rerun idle"
        rows.append((bench.name, bench.metric, value, bench.target, verdict, f"{secs:.0f}s"))
    return table(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], metavar="NAME",
                   help=f"run only these: {', '.join(b.name for b in BENCHES)}")
    p.add_argument("--quick", action="store_true", help="small shapes and few steps (rough numbers)")
    a = p.parse_args(argv)
    load_before = os.getloadavg()
    results = []
    for bench in BENCHES:
        if a.only and bench.name not in a.only:
            continue
        t0 = time.perf_counter()
        r = emit(run_one(bench, a.quick))
        results.append((bench, r, time.perf_counter() - t0))
    print("\n" + summary(results))
    print(f"\n{os.cpu_count()} CPUs; load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}" + (" (--quick: rough numbers)" if a.quick else ""))
    return 1 if any("error" in r for _, r, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
