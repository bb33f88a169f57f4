"""Training metrics: `metrics.jsonl`, TensorBoard, a progress bar or plain lines; throughput and MFU.

Every `log.every` steps one JSON line goes to `output_dir/metrics.jsonl`:

    step          completed optimizer steps (1-based)
    loss          the step's loss: mean token cross-entropy over the trained tokens of the global batch
    lr, grad_norm learning rate used by the update; global L2 norm of the gradient before clipping
    tokens        trained (loss-mask) tokens in the step's global batch
    tokens_per_s  processed tokens (global batch x seq_len, padding included) per second of wall time
    step_time_s   wall time of the step (host to host: data, dispatch, compute)
    mfu           model FLOPs utilisation against the device's spec dense peak, where known (bf16 on
                  H100/H200, TPU v4/v5e/v5p/v6e: accelerators.py)
    eval_loss     when this step evaluated the held-out split
    eval/<task>/acc, eval/<task>/n   when this step scored the `eval.tasks` multiple-choice tasks
    skipped_steps updates skipped so far because the loss or a gradient was not finite
    data_*        the data loader's counters (truncated, dropped, bad records skipped)

Only process 0 writes. On a resume, lines after the restored step are dropped first, so the file
reads like one uninterrupted run. The file is rewritten whole at each log through a temporary
sibling (`storage.write_text_atomic`), so the same code writes it on a local disk and in a bucket
(`output_dir: gs://...`, which has no append); TensorBoard's writer reaches a bucket itself.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from flacuna_jax.accelerators import peak_flops  # noqa: F401 - MFU's denominator, per chip (accelerators.py)
from flacuna_jax.storage import run_path, write_text_atomic


def flops_per_token(config: Any, seq_len: int, finetune: str) -> float:
    """Model FLOPs per processed token for one training step (no remat recompute counted).

    N = matmul weights outside the embedding lookup. Forward 2N plus attention (QK^T and PV,
    2 * 2 * layers * seq_len * heads * head_dim); backward: activation gradients 2N and twice the
    attention; full fine-tuning adds weight gradients 2N (LoRA's own factors are negligible).
    """
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    n = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    attention = 4.0 * c.num_layers * seq_len * q
    weight_grads = 2 * n if finetune == "full" else 0
    return 2 * n + attention + 2 * n + 2 * attention + weight_grads


def kept_lines(path: Any, last_step: int) -> list[str]:
    """The lines of `path` (if any) with step <= last_step; a half-written line is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            kept.append(line)
    return kept


def truncate_jsonl(path: Any, last_step: int) -> None:
    """Keeps the lines with step <= last_step (and drops a half-written last line)."""
    path = run_path(path)
    if path.is_file():
        write_text_atomic(path, "".join(k + "\n" for k in kept_lines(path, last_step)))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in run_path(path).read_text().splitlines() if line.strip()]


def _fmt_eval(record: dict) -> str:
    return f"eval_loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else ""


class MetricsLogger:
    """Writes metric records (process 0 only) and shows progress."""

    def __init__(self, output_dir: str | os.PathLike, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool | None = None):
        self.enabled, self.total, self.start = enabled, total_steps, start_step
        out = run_path(output_dir)
        self.path = out / "metrics.jsonl"
        self._lines: list[str] = []
        self._tb = self._bar = None
        self._t0 = time.time()
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._lines = kept_lines(self.path, start_step) if start_step > 0 else []
        write_text_atomic(self.path, "".join(k + "\n" for k in self._lines))  # a fresh run: an empty file
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Per-step progress (the bar); plain output only happens in `log`."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else
                      round(v, 6) if isinstance(v, float) and k.endswith("_s") else v) for k, v in record.items()}
        self._lines.append(json.dumps(record))
        write_text_atomic(self.path, "".join(k + "\n" for k in self._lines))
        step = record["step"]
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self._tb.flush()
        accs = " | ".join(f"{k[5:-4]} acc {v:.3f}" for k, v in record.items() if k.startswith("eval/") and k.endswith("/acc"))
        if self._bar is not None:
            if record.get("eval_loss") is not None or accs:
                self._bar.write(" | ".join(p for p in (f"step {step}: loss {record['loss']:.4f}", _fmt_eval(record), accs) if p))
        else:
            done = step - self.start
            eta = (time.time() - self._t0) / max(done, 1) * (self.total - step)
            parts = [f"step {step}/{self.total}"]
            for k, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("lr", ".3g"), ("grad_norm", ".3f"),
                           ("tokens_per_s", ",.0f"), ("mfu", ".1%"), ("skipped_steps", "d")):
                if record.get(k) is not None:
                    parts.append(f"{k} {format(record[k], fmt)}")
            if accs:
                parts.append(accs)
            parts.append(f"eta {eta:.0f}s")
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
