"""Serving throughput and latency: our server vs `transformers serve --continuous-batching`, continuous
vs static batching, and four adapters mixed in every batch vs the base alone.

    python -m benchmarks.serve [--model HF_DIR] [--requests 64] [--requests-at-1 8] [--clients 1 8 32] \\
        [--sides ours transformers static adapters] [--seed 0] [--out benchmarks/results/serve.jsonl]

The workload is seeded: request i asks, through /v1/chat/completions (streamed, temperature 0), for a
long story about a list of words, its prompt 16-512 tokens long and its max_tokens drawn from
16-256 (defaults; --prompt-range, --max-tokens-range). Both servers get the same chat prompt ids (the
tokenizer's chat template: ours with the request field "template": "tokenizer"), the same model
(default: SmolLM2-135M-Instruct, fp32, CPU) and the same requests, one server at a time; a pass at
C clients keeps C requests in flight until the list is done. Measured per pass: output tokens/s
(from the streamed `usage`, else the reply re-tokenized), time to first token p50/p99 (first
non-empty content chunk). Each server is warmed up first with one request per prompt-length bucket,
one long request, and a pass of the workload drawn with the next seed at the largest client count
(our XLA compiles: one per shape of the decode slots, the prefill and the insert of a prompt's cache
into them; transformers' first calls), so the passes measure a server in its steady state; the
warm-up pass's own line is printed too, marked "warm_up".

Sides: ours (`python -m flacuna_jax.serve --max-batch 32`); transformers (`transformers serve
--continuous-batching --device cpu --dtype float32`, torch); static (our `generate.Generator`, the
requests in arrival order in batches of C, each batch decoding until its longest budget: what our
batch decoder does without continuous batching; its "TTFT" is when the batch ends); adapters (our
server with four random r=8 q/v PEFT adapters, requests round-robin over them, vs ours on the base at
the largest client count). Targets (`summary`): ours >= 3x transformers' output tokens/s at 32
clients with TTFT p50 no worse; continuous >= 1.5x static at 32; adapters >= 0.8x base.

One JSON line per pass, then a summary line (last); all are appended to --out. Timings on a shared
machine are noisy: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, child_env, emit

WORDS = ("river stone maple cloud ember harbor violet copper meadow falcon lantern orchard thunder velvet glacier "
         "compass saffron willow beacon canyon harvest marble whisper cobalt meadow prairie quartz summit").split()


def workload(tokenizer, n: int, seed: int, prompt_range=(16, 512), max_tokens_range=(16, 256)) -> list[dict]:
    """n requests: {"text", "prompt_tokens" (the user text alone), "max_tokens"}, the same for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        target = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        head = "Write a long, detailed story that uses these words:"
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), target)]
        ids = tokenizer(head + " " + " ".join(words), add_special_tokens=False)["input_ids"][:target]
        text = tokenizer.decode(ids)
        out.append({"text": text, "prompt_tokens": len(ids),
                    "max_tokens": int(rng.integers(max_tokens_range[0], max_tokens_range[1] + 1))})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server child process on 127.0.0.1; stopped (terminated, then killed) on exit."""

    def __init__(self, argv: list[str], port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 1800) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(60)


async def one_request(http, url: str, body: dict, tokenizer) -> dict:
    start = time.perf_counter()
    first, text, usage = None, "", None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    if usage and usage.get("completion_tokens") is not None:
        tokens, counted = int(usage["completion_tokens"]), "usage"
    else:
        tokens, counted = len(tokenizer(text, add_special_tokens=False)["input_ids"]), "retokenized"
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens, "counted": counted,
            "seconds": time.perf_counter() - start}


async def run_pass(url: str, bodies: list[dict], clients: int, tokenizer) -> dict:
    import httpx

    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def guarded(body):
            async with sem:
                return await one_request(http, url, body, tokenizer)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(b) for b in bodies))
        wall = time.perf_counter() - start
    return summarize(results, wall, clients)


def summarize(results: list[dict], wall: float, clients: int) -> dict:
    ok = [r for r in results if "error" in r] == []
    done = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft"] for r in done]) if done else np.array([np.nan])
    tokens = sum(r["tokens"] for r in done)
    return {"clients": clients, "requests": len(results), "errors": [r["error"] for r in results if "error" in r][:3],
            "all_ok": ok, "output_tokens": tokens, "seconds": round(wall, 2),
            "output_tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
            "tokens_counted_by": sorted({r["counted"] for r in done})}


def bodies_for(requests: list[dict], model_ids: list[str], extra: dict) -> list[dict]:
    return [{"model": model_ids[i % len(model_ids)], "messages": [{"role": "user", "content": r["text"]}],
             "max_tokens": r["max_tokens"], "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
             **extra} for i, r in enumerate(requests)]


def text_of_tokens(tokenizer, n: int) -> str:
    """A story request whose text is n tokens long."""
    words = " ".join(WORDS[i % len(WORDS)] for i in range(n))
    ids = tokenizer("Write a long, detailed story that uses these words: " + words, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n])


def warm_up(url: str, model_ids: list[str], extra: dict, tokenizer, prompt_max: int, new_max: int,
            warm_requests: list[dict], clients: int) -> dict:
    """One request per prompt width our server prefills at (`engine.prompt_width`) and two long ones per
    model id, then `warm_requests` (the workload drawn with another seed) at `clients`, so compiles are
    not measured: a batch of shapes (rows x columns of the decode slots, prompt widths) like the
    measured passes'. Returns that pass's row."""
    from flacuna_jax.serve.engine import prompt_width

    widths = sorted({prompt_width(n, 16) for n in range(1, prompt_max + 1)})  # the server's --min-prefill-bucket 16
    warm = [{"text": text_of_tokens(tokenizer, min(width, prompt_max)), "max_tokens": 4} for width in widths]
    long = [{"text": text_of_tokens(tokenizer, prompt_max), "max_tokens": new_max}]
    for model in model_ids:
        asyncio.run(run_pass(url, bodies_for(warm, [model], extra), 1, tokenizer))
        asyncio.run(run_pass(url, bodies_for(long * 2, [model], extra), 2, tokenizer))
    return asyncio.run(run_pass(url, bodies_for(warm_requests, model_ids, extra), clients, tokenizer))


def server_passes(side: str, argv: list[str], port: int, model_ids: list[str], extra: dict, requests, levels, tokenizer,
                  a, workdir: Path) -> list[dict]:
    rows = []
    with Server(argv, port, workdir / f"{side}.log") as srv:
        srv.wait_ready()
        warm_requests = workload(tokenizer, len(requests), a.seed + 1, tuple(a.prompt_range), tuple(a.max_tokens_range))
        row = warm_up(srv.url, model_ids, extra, tokenizer, a.prompt_range[1], a.max_tokens_range[1], warm_requests,
                      max(levels))
        print(json.dumps({"benchmark": "serve", "side": side, "warm_up": True} | row), flush=True)
        for clients in levels:
            subset = requests[:a.requests_at_1] if clients == 1 else requests
            row = {"benchmark": "serve", "side": side} | asyncio.run(
                run_pass(srv.url, bodies_for(subset, model_ids, extra), clients, tokenizer))
            rows.append(emit(row))
    return rows


def static_pass(model_dir: str, tokenizer, requests: list[dict], clients: int) -> dict:
    """Our batch decoder without continuous batching: batches of `clients` in arrival order, each decoding to its
    longest budget; a request's tokens are cut at its own budget (and EOS)."""
    from flacuna_jax.generate import Generator
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.lm_eval import generation_eos_ids

    model, params = load_for_inference(model_dir, layers="unrolled")  # as the generate CLI and the server run it
    eos = generation_eos_ids(model_dir, model.config.eos_token_id)
    gen = Generator(model, params, eos_ids=eos, pad_id=tokenizer.pad_token_id or 0, batch_size=clients)
    prompts = [chat_ids(tokenizer, r["text"]) for r in requests]
    budgets = [r["max_tokens"] for r in requests]
    for k in range(0, min(len(prompts), clients), clients):  # warm-up: the shapes of the first batch
        gen.generate_ids(prompts[:clients], max(budgets[:clients]), shared=0)
    results, start = [], time.perf_counter()
    for k in range(0, len(prompts), clients):
        batch, budget = prompts[k:k + clients], budgets[k:k + clients]
        out = gen.generate_ids(batch, max(budget), shared=0)
        end = time.perf_counter() - start
        results += [{"ttft": end, "tokens": min(len(o), b), "counted": "ids"} for o, b in zip(out, budget)]
    return {"benchmark": "serve", "side": "static"} | summarize(results, time.perf_counter() - start, clients) | {
        "note": "ttft: when the request's batch ended (no streaming)"}


def chat_ids(tokenizer, text: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def write_adapters(model_dir: str, root: Path, n: int = 4, rank: int = 8, seed: int = 0) -> list[str]:
    """n random PEFT adapters (q_proj, v_proj, r=8, alpha 16) for the model, B small so the replies stay text."""
    from flacuna_jax.hf import load_hf_config
    from flacuna_jax.model import LoraSpec
    from flacuna_jax.peft_io import factor_shapes, save_adapter

    config = load_hf_config(model_dir)
    spec = LoraSpec(rank, 2.0 * rank, 0.0, ("q_proj", "v_proj"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tree = {"layers": {"attn": {}}}
        for target in spec.targets:
            a_shape, b_shape = factor_shapes(config, target, rank)
            tree["layers"]["attn"][target] = {"lora_a": rng.normal(0, 0.02, a_shape).astype(np.float32),
                                              "lora_b": rng.normal(0, 0.02, b_shape).astype(np.float32)}
        out.append(str(save_adapter(root / f"a{i}", tree, spec, config.num_layers, model_dir)))
    return out


def ours_argv(model_dir: str, port: int, max_batch: int, max_len: int, adapters=()) -> list[str]:
    argv = [sys.executable, "-m", "flacuna_jax.serve", "--model", model_dir, "--port", str(port), "--max-batch",
            str(max_batch), "--max-model-len", str(max_len), "--tensor", "1", "--log-level", "warning",
            "--served-model-name", "base"]
    for i, path in enumerate(adapters):
        argv += ["--adapter", f"a{i}={path}"]
    return argv


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--requests", type=int, default=64, help="requests per pass at more than one client (twice 32: each slot is refilled)")
    p.add_argument("--requests-at-1", type=int, default=8, help="requests of the one-client pass (the list's first)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--sides", nargs="+", default=["ours", "transformers", "static", "adapters"],
                   choices=["ours", "transformers", "static", "adapters"])
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens-range", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--max-batch", type=int, default=32, help="our decode slots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.jsonl"), help="JSON lines appended here ('' for none)")
    a = p.parse_args(argv)
    if a.model is None:
        from benchmarks.smollm2 import smollm2_dir

        a.model = str(smollm2_dir())
    from flacuna_jax.tokenizer import load_tokenizer

    load_before = os.getloadavg()
    tokenizer = load_tokenizer(a.model)
    requests = workload(tokenizer, a.requests, a.seed, tuple(a.prompt_range), tuple(a.max_tokens_range))
    chat_len = len(chat_ids(tokenizer, "")) + a.prompt_range[1] + a.max_tokens_range[1]
    max_len = 1 << (chat_len - 1).bit_length()
    top = max(a.clients)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if "ours" in a.sides:
            port = free_port()
            rows += server_passes("ours", ours_argv(a.model, port, a.max_batch, max_len), port, ["base"],
                                  {"template": "tokenizer"}, requests, a.clients, tokenizer, a, work)
        if "transformers" in a.sides:
            port = free_port()
            argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                    "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32", a.model]
            rows += server_passes("transformers", argv, port, [a.model], {}, requests, a.clients, tokenizer, a, work)
        if "static" in a.sides:
            rows.append(emit(static_pass(a.model, tokenizer, requests, top)))
        if "adapters" in a.sides:
            paths = write_adapters(a.model, work)
            port = free_port()
            rows += server_passes("ours_4_adapters", ours_argv(a.model, port, a.max_batch, max_len, paths), port,
                                  [f"a{i}" for i in range(len(paths))], {"template": "tokenizer"}, requests, [top],
                                  tokenizer, a, work)
    summary = summary_row(rows, top, a, load_before)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            for row in rows + [summary]:
                f.write(json.dumps(row) + "\n")
    return emit(summary)


def summary_row(rows: list[dict], top: int, a, load_before) -> dict:
    def at(side):
        return next((r for r in rows if r["side"] == side and r["clients"] == top), None)

    ours, theirs, static, adapters = at("ours"), at("transformers"), at("static"), at("ours_4_adapters")

    def ratio(x, y):
        return round(x["output_tokens_per_s"] / y["output_tokens_per_s"], 2) if x and y and y["output_tokens_per_s"] else None

    vs_tf, vs_static, adapter_ratio = ratio(ours, theirs), ratio(ours, static), ratio(adapters, ours)
    ttft_ok = ours["ttft_p50_s"] <= theirs["ttft_p50_s"] if ours and theirs else None
    return {"benchmark": "serve", "summary": True, "clients": top, "model": a.model, "device": "cpu",
            "ours_vs_transformers": vs_tf, "ttft_p50_ours_s": ours and ours["ttft_p50_s"],
            "ttft_p50_transformers_s": theirs and theirs["ttft_p50_s"], "continuous_vs_static": vs_static,
            "adapters_vs_base": adapter_ratio,
            "meets_target": {"vs_transformers": None if vs_tf is None else bool(vs_tf >= 3 and ttft_ok),
                             "vs_static": None if vs_static is None else vs_static >= 1.5,
                             "adapters": None if adapter_ratio is None else adapter_ratio >= 0.8},
            "all_ok": all(r.get("all_ok", True) for r in rows),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "command": "python -m benchmarks.serve " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
