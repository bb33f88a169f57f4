"""The engine's state in Prometheus' text exposition format (version 0.0.4), for `GET /metrics`.

Gauges: requests queued, decode slots running and their number. Counters: generated and prompt
tokens, decode steps, engine requests by outcome (finished, cancelled: the client went away,
failed). Histogram: time from submission to the first generated token.
"""

from __future__ import annotations

from typing import Any

from flacuna_jax.serve.engine import TTFT_BUCKETS, Engine


def prometheus_text(engine: Engine) -> str:
    """The engine's gauges and counters in Prometheus' text format (version 0.0.4)."""
    counts, st = engine.counts(), dict(engine.stats)
    lines = []

    def metric(name: str, kind: str, help_: str, value: Any, labels: str = "") -> None:
        lines.extend([f"# HELP flacuna_{name} {help_}", f"# TYPE flacuna_{name} {kind}", f"flacuna_{name}{labels} {value}"])

    metric("requests_queued", "gauge", "Requests waiting for decode slots.", counts["queued"])
    metric("requests_running", "gauge", "Decode slots generating (one per choice in flight).", counts["running"])
    metric("decode_slots", "gauge", "Decode slots (--max-batch).", counts["slots"])
    metric("generated_tokens_total", "counter", "Tokens generated.", st["generated_tokens"])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", st["prompt_tokens"])
    metric("decode_steps_total", "counter", "Batched decode steps run.", st["decode_steps"])
    lines += ["# HELP flacuna_requests_total Engine requests that ended, by how.", "# TYPE flacuna_requests_total counter"]
    for status in ("finished", "cancelled", "failed"):
        lines.append(f'flacuna_requests_total{{status="{status}"}} {st[f"requests_{status}"]}')
    lines += ["# HELP flacuna_time_to_first_token_seconds From submission to the first generated token.",
              "# TYPE flacuna_time_to_first_token_seconds histogram"]
    for bound, count in zip(TTFT_BUCKETS, engine.ttft_buckets):
        lines.append(f'flacuna_time_to_first_token_seconds_bucket{{le="{bound}"}} {count}')
    lines.append(f'flacuna_time_to_first_token_seconds_bucket{{le="+Inf"}} {st["ttft_count"]}')
    lines.append(f"flacuna_time_to_first_token_seconds_sum {st['ttft_sum']:.6f}")
    lines.append(f"flacuna_time_to_first_token_seconds_count {st['ttft_count']}")
    return "\n".join(lines) + "\n"
