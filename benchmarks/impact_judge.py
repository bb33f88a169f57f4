"""Wall time of IMPACT's judging: 200 prompts x 2 modes at the default concurrency vs one request at a time.

    python -m benchmarks.impact_judge                                  # the stub judge, 0.25 s per request
    python -m benchmarks.impact_judge --stub-latency 0.05 --prompts 20 # quick
    python -m benchmarks.impact_judge --server flacuna --server-model .cache/smollm2 --max-tokens 16
    python -m benchmarks.impact_judge --judge-url URL --judge-model NAME   # a server already running

Prints one JSON line. The requests are IMPACT's judge prompts (flacuna_jax/evals/impact_rubrics.py),
relevance and coherence, for `--prompts` synthetic records (the four categories in turn) with one
synthetic answer each (~120 words); each side starts with an empty cache, so every request is sent,
through `flacuna_jax.evals.judge.ChatJudge` (concurrency `--concurrency`, default the CLI's 8, vs 1).
The judge is, by default, the stub (benchmarks/judge_stub.py) answering every request after a fixed
latency: the ratio then measures the client's concurrency alone (ideal: the concurrency), not a model.
With `--server` (a command line, see benchmarks/judge_server.py: "flacuna" is our
`python -m flacuna_jax.serve`, "transformers" is `transformers serve`) or `--judge-url`, it is a real
server, and the ratio is what that server gains from requests in flight together.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import emit

CATEGORIES = ("informative", "professional", "argumentative", "creative")
SENTENCE = ("Rivers shape the land they cross, carving valleys, carrying silt to the sea and feeding the farms "
            "and towns that grow along their banks. ")


def requests(n: int):
    from flacuna_jax.evals.impact_rubrics import TEMPLATES, judge_prompt
    from flacuna_jax.evals.judge import JudgeRequest

    out = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        prompt = f"Write a {category} text about rivers and the towns along them (prompt {i})."
        answer = f"Answer {i}. " + SENTENCE * 4
        out += [JudgeRequest(mode, judge_prompt(mode, answer, prompt), f"{category} #{i} {mode}") for mode in TEMPLATES]
    return out


def timed(base_url: str, model: str, reqs, concurrency: int, max_tokens: int | None, timeout_s: float) -> tuple[float, int]:
    from flacuna_jax.evals.judge import ChatJudge

    with tempfile.TemporaryDirectory() as d:
        judge = ChatJudge(base_url, model, concurrency=concurrency, max_tokens=max_tokens, timeout_s=timeout_s,
                          cache_path=os.path.join(d, "cache.jsonl"))
        t0 = time.perf_counter()
        replies = judge.ask(reqs)
        return time.perf_counter() - t0, sum(r.text is None for r in replies)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200, help="IMPACT records (two requests each); the dataset has 200")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight on the concurrent side (the CLI's default)")
    p.add_argument("--stub-latency", type=float, default=0.25, help="seconds the stub judge takes per request")
    p.add_argument("--server", help="start a real judge: flacuna | transformers | a command template (judge_server.py)")
    p.add_argument("--server-model", default=".cache/smollm2", help="the model the started server serves")
    p.add_argument("--judge-url", help="a judge already running (with --judge-model)")
    p.add_argument("--judge-model", help="its model name")
    p.add_argument("--max-tokens", type=int, help="reply token limit (a small local judge rambles otherwise)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    a = p.parse_args(argv)
    reqs = requests(a.prompts)
    load_before = os.getloadavg()

    def run(base_url: str, model: str, label: str) -> dict:
        concurrent_s, failed_c = timed(base_url, model, reqs, a.concurrency, a.max_tokens, a.timeout)
        serial_s, failed_s = timed(base_url, model, reqs, 1, a.max_tokens, a.timeout)
        return {"benchmark": "impact_judge", "judge": label, "requests": len(reqs), "concurrency": a.concurrency,
                "concurrent_s": round(concurrent_s, 3), "serial_s": round(serial_s, 3),
                "ratio": round(serial_s / concurrent_s, 2), "failed": failed_c + failed_s,
                "load_avg_before": [round(x, 2) for x in load_before],
                "load_avg_after": [round(x, 2) for x in os.getloadavg()]}

    if a.judge_url:
        return emit(run(a.judge_url, a.judge_model or "", f"{a.judge_url} ({a.judge_model})"))
    if a.server:
        from benchmarks.judge_server import COMMANDS, JudgeServer

        with JudgeServer(COMMANDS.get(a.server, a.server), a.server_model) as server:
            return emit(run(server.base_url, server.model_name, f"{a.server} server on {a.server_model}, CPU"))
    from benchmarks.judge_stub import StubJudge

    with StubJudge(latency_s=a.stub_latency) as stub:
        return emit(run(stub.base_url, "stub-judge", f"stub, fixed {a.stub_latency} s per request"))


if __name__ == "__main__":
    main()
