"""Runs `Benchmark`s (see `benchmark`) on one (model, params): batched, with a progress bar and ETA.

Generate requests go through our KV-cache decoder (`generate.Generator`, one compiled while-loop per
batch shape): prompts are tokenized raw by the tokenizer's own rules (BOS only where it adds one),
batched by `generate.plan_batches` (a task's prompts, which share their header and shots, together,
that prefix prefilled once for the task; then by length), decoded `batch_size` at a time, and each
completion is decoded with `skip_special_tokens=True` (what InstructEval's `tokenizer.decode` of the
new tokens gives). `samples > 1` repeats each prompt that many times in the batch, each row drawing
its own tokens. NextTokenLogits requests run one forward pass per prompt (right-padded batches,
the last real position's hidden state times the output embedding).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax.evals.benchmark import Benchmark, Example, Generate, NextTokenLogits, Result, Scored
from flacuna_jax.generate import plan_batches


class Progress:
    """A one-line progress bar with rate and ETA on stderr (a plain line per update when not a TTY)."""

    def __init__(self, label: str, total: int, out=None, every_s: float = 2.0):
        self.label, self.total, self.done, self.out = label, total, 0, out or sys.stderr
        self.start = self.last = time.perf_counter()
        self.every_s, self.tty = every_s, getattr(self.out, "isatty", lambda: False)()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"{self.label:>10} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:.2f} ex/s, elapsed {_clock(elapsed)}, ETA {_clock(eta)}")
        self.out.write(("\r" + line + ("\n" if self.done >= self.total else "")) if self.tty else line + "\n")
        self.out.flush()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def stop_ids(model_dir: str | Path, model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids transformers' `generate` stops at: generation_config.json's eos_token_id (an id or a
    list) where the model dir has one, else config.json's, plus the tokenizer's EOS."""
    ids = [model.config.eos_token_id, tokenizer.eos_token_id]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            raise ValueError(f"{gen}: not valid JSON") from None
        ids += eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


@dataclasses.dataclass
class BenchmarkRun:
    name: str
    examples: list[Example]
    scored: list[Scored]
    result: Result
    seconds: float


class Runner:
    """Everything needed to answer a benchmark's requests with one model."""

    def __init__(self, model: Any, params: Any, tokenizer: Any, batch_size: int = 8, seed: int = 0,
                 eos_ids: Sequence[int] | None = None, progress_out=None):
        from flacuna_jax.generate import Generator

        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.seed, self.progress_out = batch_size, seed, progress_out
        self.context = model.config.max_position_embeddings
        if eos_ids is None:
            eos_ids = [e for e in (model.config.eos_token_id, tokenizer.eos_token_id) if e is not None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.generator = Generator(model, params, eos_ids=tuple(dict.fromkeys(eos_ids)), pad_id=pad,
                                   batch_size=batch_size)
        self._last_logits = None
        self._stop = None

    # ---------------------------------------------------------------- the length rule
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def fits_for(self, request: Generate | NextTokenLogits) -> Callable[[str], bool]:
        limit = min(request.max_input_tokens, self.context)
        return lambda prompt: self.count_tokens(prompt) <= limit

    # ---------------------------------------------------------------- the requests
    def generate(self, prompts: Sequence[str], request: Generate, label: str = "",
                 stop_table: np.ndarray | None = None) -> list[list[str]]:
        """`request.samples` completion texts per prompt, batched through the KV-cache decoder
        (`stop_table`: rows may end early, see `generate.make_decoder`)."""
        ids = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        for p, x in zip(prompts, ids):
            if not x:
                raise ValueError(f"{label}: a prompt tokenizes to nothing: {p[:60]!r}")
        rows = [i for i in range(len(ids)) for _ in range(request.samples)]
        texts: list[str] = [""] * len(rows)
        bar = Progress(label, len(rows), self.progress_out)
        for n, planned in enumerate(plan_batches([ids[r] for r in rows], self.batch_size)):
            chunk = planned.indices
            batch = [ids[rows[r]] for r in chunk]
            if len(batch) == 1 and len(rows) > 1:
                batch = batch * 2  # keep the batch shape compiled for the others (a single prompt runs unpadded)
            completions = self.generator.generate_ids(batch, request.max_new_tokens, request.temperature,
                                                      seed=self.seed + n, capacity=capacity(request.max_new_tokens),
                                                      stop_table=stop_table, shared=planned.shared)
            for r, c in zip(chunk, completions):
                texts[r] = self.tokenizer.decode(c, skip_special_tokens=True)
            bar.update(len(chunk))
        return [texts[i * request.samples:(i + 1) * request.samples] for i in range(len(prompts))]

    def next_token_logits(self, prompts: Sequence[str], tokens: Sequence[str], label: str = "") -> list[list[float]]:
        """The raw logit of each token text's first id at the position after each prompt."""
        token_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in tokens]
        ids = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        if self._last_logits is None:
            self._last_logits = _make_last_logits(self.model)
        from flacuna_jax.generate import bucket_width

        out: list[list[float]] = [[] for _ in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        bar = Progress(label, len(prompts), self.progress_out)
        token_ids_k = jnp.asarray(token_ids, jnp.int32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = bucket_width(max(len(ids[i]) for i in chunk))
            ids_bt = np.zeros((self.batch_size, width), np.int32)
            seg_bt = np.zeros((self.batch_size, width), np.int32)
            last_b = np.zeros((self.batch_size,), np.int32)
            for row, i in enumerate(chunk):
                ids_bt[row, :len(ids[i])], seg_bt[row, :len(ids[i])], last_b[row] = ids[i], 1, len(ids[i]) - 1
            logits = np.asarray(jax.device_get(self._last_logits(
                self.params, jnp.asarray(ids_bt), jnp.asarray(seg_bt), jnp.asarray(last_b), token_ids_k)))
            for row, i in enumerate(chunk):
                out[i] = [float(x) for x in logits[row]]
            bar.update(len(chunk))
        return out

    def _stop_table(self, bench: Benchmark) -> np.ndarray | None:
        """A benchmark with `stop_when` (HumanEval: a blank line after the code ends what is executed)
        has its rows stopped there in the loop, by `humaneval.stop_table`, the same rule token by token."""
        if getattr(bench, "stop_when", None) is None:
            return None
        from flacuna_jax.evals.humaneval import stop_table

        if self._stop is None:
            table = stop_table(self.tokenizer)
            extra = self.model.config.vocab_size - table.shape[0]  # ids past the tokenizer's: no text, no move
            self._stop = np.concatenate([table, np.tile(np.arange(table.shape[1], dtype=table.dtype), (extra, 1))]) \
                if extra > 0 else table
        return self._stop

    # ---------------------------------------------------------------- a benchmark
    def run(self, bench: Benchmark) -> BenchmarkRun:
        t0 = time.perf_counter()
        request = bench.request
        examples = bench.examples(self.fits_for(request))
        if isinstance(request, Generate):
            outputs: list = self.generate([e.prompt for e in examples], request, bench.name, self._stop_table(bench))
        elif isinstance(request, NextTokenLogits):
            flat = [p for e in examples for p in (e.prompt, *e.extra_prompts)]
            logits = self.next_token_logits(flat, request.tokens, bench.name)
            outputs, pos = [], 0
            for e in examples:
                n = 1 + len(e.extra_prompts)
                outputs.append(logits[pos:pos + n])
                pos += n
        else:
            raise TypeError(f"{bench.name}: unknown request {request!r}")
        scored = bench.score(examples, outputs)
        return BenchmarkRun(bench.name, examples, scored, bench.aggregate(scored), time.perf_counter() - t0)


def capacity(max_new_tokens: int) -> int:
    """New-token slots the decoder is compiled for: 32 covers MMLU's 2, DROP/CRASS's 8 and BBH's 32 with
    one compiled loop per prompt width (the loop still stops at each benchmark's own limit)."""
    from flacuna_jax.generate import bucket_width

    return bucket_width(max_new_tokens, minimum=32)


@functools.lru_cache(maxsize=8)
def _make_last_logits(model: Any):
    """jit fn(params, ids_bt, segment_ids_bt, last_b, token_ids_k) -> logits [b, k] of those tokens at
    position last_b (the output projection applied to that one position only, not the whole vocabulary)."""

    @jax.jit
    def last_logits(params, ids_bt, seg_bt, last_b, token_ids_k):
        h_btd = model.apply({"params": params}, ids_bt, None, seg_bt, return_hidden=True)
        h_bd = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)[:, 0]
        w_dk = jnp.take(model.output_embedding(params), token_ids_k, axis=1).astype(h_bd.dtype)
        return (h_bd @ w_dk).astype(jnp.float32)

    return last_logits
