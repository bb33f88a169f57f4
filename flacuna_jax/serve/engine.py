"""The serving engine: continuous (in-flight) batching over a fixed number of decode slots. No HTTP.

State on the device: one KV cache of up to `max_batch` slots (the model's cache layout, with one
write index per slot), and per slot on the host: its last token, adapter, sampling parameters, stop
strings and token budget. A decode step computes every row of the cache, so the cache has only the
rows and columns in use, in buckets (powers of two): rows up to the highest busy slot (a new request
takes the lowest free slot), columns up to the longest sequence in flight. It grows by a copy when a
slot or a sequence needs more. When the busy slots would fit a smaller row bucket than the highest of
them needs, they are moved down to the lowest rows (their rows of the cache copied, nothing else);
columns shrink when three quarters of them are idle. Each (rows, columns) shape compiles once. The
jitted functions that fill and advance the slots (prefill, insert, decode step, resize, take_rows)
are `slots.py`'s.

The scheduler (`step`, run in a loop by one thread) admits queued requests into free slots while
the other slots keep decoding, hands each new token to its request's callback, and frees a slot at
EOS, at a stop string, at the token budget or when the request is cancelled (a client that went
away). A request with n choices is prefilled once and inserted into n slots. Token k of a choice is
drawn with fold_in(key(seed), k), so a seeded choice is the same whatever else shares the batch.

Submitting and cancelling are thread-safe; everything else runs on the engine's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flacuna_jax.generate import bucket_width
from flacuna_jax.serve.slots import compile_slot_functions, empty_cache
from flacuna_jax.serve.text import TextStream

log = logging.getLogger(__name__)

# The smallest cache (rows). One row is its own bucket: with XLA's dots (`--matmul xla`) one row times
# a weight matrix runs at memory speed but 2-4 rows as a small matrix product at well under half that
# (SmolLM2's matmuls alone: 39 / 57 / 86 ms for 1 / 2 / 4 rows, `benchmarks/decode_profile.py
# --matmul-rows`).
MIN_ROWS = 1
# Prompts longer than this are prefilled at a multiple of it (`prompt_width`). Against 128, SmolLM2's
# 32-client serving workload prefills 8% fewer padded tokens, ~5% more tokens/s, for twice the prompt
# widths to compile.
PREFILL_STEP = 64
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def prompt_width(n: int, minimum: int) -> int:
    """The width an n-token prompt is prefilled at: the next power of two (at least `minimum`) up to
    PREFILL_STEP, then the next multiple of PREFILL_STEP. A power of two would pad a 300-token prompt to
    512 (70% more prefill compute, vs 320); exact lengths would compile once per length."""
    width = bucket_width(n, minimum)
    return width if width <= PREFILL_STEP else -(-n // PREFILL_STEP) * PREFILL_STEP


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one choice is generated."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # 32-bit
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """What a choice's consumer receives: new text, the ids generated with it, and at the end why it stopped
    ("stop": EOS or a stop string, "length": max_tokens, "error")."""

    choice: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    choices: list[Sampling]
    adapter: int
    decode: Callable[[Sequence[int]], str]
    on_event: Callable[[Event], None]
    id: int = 0
    submitted: float = 0.0
    first_token: float | None = None
    open_choices: int = 0
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Slot:
    request: Request
    choice: int
    sampling: Sampling
    stream: TextStream
    ids: list[int] = dataclasses.field(default_factory=list)


class Engine:
    def __init__(self, model: Any, params: Any, *, eos_ids: Sequence[int], max_batch: int = 8, max_model_len: int | None = None,
                 max_queue: int = 256, pad_id: int = 0, cache_sharding: Any = None, min_bucket: int = 16):
        self.model, self.params = model, params
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.max_batch = int(max_batch)
        self.max_model_len = int(max_model_len or model.config.max_position_embeddings)
        if not 1 <= self.max_batch or not 2 <= self.max_model_len <= model.config.max_position_embeddings:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_model_len {max_model_len} in "
                             f"[2, {model.config.max_position_embeddings}] (the model's window)")
        self.max_queue, self.pad_id, self.min_bucket = int(max_queue), int(pad_id), int(min_bucket)
        self.has_bank = model.bank is not None
        self.num_adapters = model.bank.count if self.has_bank else 1
        self.cache_sharding = cache_sharding
        self.cache = empty_cache(model, self._row_bucket(1), self._bucket(1), cache_sharding)
        b = self.max_batch
        self.slots: list[_Slot | None] = [None] * b
        self.tokens = np.zeros((b,), np.int32)
        self.adapters = np.zeros((b,), np.int32)
        self.seeds = np.zeros((b,), np.uint32)
        self.counters = np.zeros((b,), np.int32)
        self.temperatures = np.zeros((b,), np.float32)
        self.top_ps = np.ones((b,), np.float32)
        self._index = np.zeros((b,), np.int64)  # each slot's next write column (host copy of cache["index"])
        self.fns = compile_slot_functions(model)
        self._prefixes: list[tuple[int, ...]] = []
        self._prefix_cache: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.stats = {"requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0, "generated_tokens": 0,
                      "prompt_tokens": 0, "ttft_sum": 0.0, "ttft_count": 0, "decode_steps": 0}
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)

    # ------------------------------------------------------------------ the cache's shape

    def _bucket(self, n: int) -> int:
        return min(bucket_width(n, self.min_bucket), self.max_model_len)

    def _row_bucket(self, n: int) -> int:
        return min(bucket_width(n, min(MIN_ROWS, self.max_batch)), self.max_batch)

    @property
    def rows(self) -> int:
        return int(self.cache["segment_ids"].shape[0])

    @property
    def width(self) -> int:
        return int(self.cache["segment_ids"].shape[1])

    def _compact(self) -> None:
        """The busy slots moved to the lowest rows when they fit a smaller row bucket than the highest of
        them needs (the server's 32-client benchmark: a third of the steps ran under 17 busy slots in 32
        rows, a step over 32 rows costing ~2x one over 16 and ~4x one over 4)."""
        busy = [i for i, s in enumerate(self.slots) if s is not None]
        if not busy or self._row_bucket(len(busy)) >= self._row_bucket(busy[-1] + 1):
            return
        order = busy + [i for i, s in enumerate(self.slots) if s is None]  # slot j takes what slot order[j] held
        rows = self._row_bucket(len(busy))  # below the cache's rows, which hold busy[-1]
        self.cache = self.fns.take_rows(self.cache, np.array(order[:rows], np.int32))
        self.slots = [self.slots[i] for i in order]
        for name in ("tokens", "adapters", "seeds", "counters", "temperatures", "top_ps", "_index"):
            setattr(self, name, getattr(self, name)[order])

    def _fit(self, rows: int = 0, columns: int = 0) -> None:
        """The cache resized, if need be, to hold the busy slots and `rows`, their next columns and `columns`."""
        busy = [i for i, s in enumerate(self.slots) if s is not None]
        rows = max([rows, 1] + [i + 1 for i in busy])
        columns = max([columns, 1] + [int(self._index[i]) + 1 for i in busy])
        # rows follow the busy slots both ways: a step over a spare row costs more than the resize's one copy of
        # the cache (SmolLM2: a 2-row step's matmuls take ~1.5x a 1-row step's); columns shrink lazily (`_fitted`)
        shape = (self._row_bucket(rows), _fitted(self.width, columns, self._bucket))
        if shape != (self.rows, self.width):
            self.cache = self.fns.resize(self.cache, *shape)

    # ------------------------------------------------------------------ submitting (any thread)

    def submit(self, prompt_ids: Sequence[int], choices: Sequence[Sampling], on_event: Callable[[Event], None],
               decode: Callable[[Sequence[int]], str], adapter: int = 0) -> Request:
        """Queues a request (raises QueueFull when `max_queue` requests wait); events arrive on the engine's thread."""
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not 1 <= len(choices) <= self.max_batch:
            raise ValueError(f"{len(choices)} choices: between 1 and {self.max_batch} (the decode slots)")
        if not 0 <= adapter < self.num_adapters:
            raise ValueError(f"adapter index {adapter} out of range [0, {self.num_adapters})")
        vocab = self.model.config.vocab_size
        if any(not 0 <= i < vocab for i in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for c in choices:
            if c.max_tokens < 1 or len(prompt_ids) + c.max_tokens > self.max_model_len:
                raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {c.max_tokens} must fit max_model_len "
                                 f"{self.max_model_len} (max_tokens >= 1)")
        request = Request(prompt_ids, list(choices), adapter, decode, on_event, id=next(self._ids),
                          submitted=time.monotonic(), open_choices=len(choices))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """The request's slots are freed at the next step (a client that went away)."""
        request.cancelled = True
        self._wake.set()

    def register_prefix(self, ids: Sequence[int]) -> None:
        """A prefix many prompts start with (the chat template's system prompt): prefilled once per adapter."""
        ids = tuple(int(i) for i in ids)
        if ids and ids not in self._prefixes and prompt_width(len(ids), self.min_bucket) < self.max_model_len:
            self._prefixes.append(ids)

    # ------------------------------------------------------------------ the scheduler (engine thread)

    def step(self) -> bool:
        """Cancellations, admissions into free slots, one decode step. False when there was nothing to do."""
        self._drop_cancelled()
        admitted = self._admit()
        if not any(s is not None for s in self.slots):
            return admitted
        self._compact()
        self._fit()
        r = self.rows
        active = np.array([s is not None for s in self.slots[:r]])
        self.cache, next_b = self.fns.step(self.params, self.cache, self.tokens[:r], active, self.adapters[:r],
                                           self.seeds[:r], self.counters[:r], self.temperatures[:r], self.top_ps[:r])
        next_b = np.asarray(jax.device_get(next_b))
        self.stats["decode_steps"] += 1
        busy = np.flatnonzero(active)
        self._index[busy] += 1
        for i in busy:
            self._accept(int(i), int(next_b[i]))
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self.stats["requests_cancelled"] += 1
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._free(i)
                slot.request.open_choices -= 1
                if slot.request.open_choices == 0:
                    self.stats["requests_cancelled"] += 1

    def _admit(self) -> bool:
        admitted = False
        while True:
            free = [i for i, s in enumerate(self.slots) if s is None]
            with self._lock:
                if not self._waiting or len(self._waiting[0].choices) > len(free):
                    return admitted
                request = self._waiting.popleft()
            try:
                self._start(request, free)
            except Exception as e:  # a failure of this request's prefill: report it, keep serving the others
                log.exception("prefill of request %d failed", request.id)
                self.stats["requests_failed"] += 1
                self._emit(request, Event(0, "", (), "error"))
                self.error = e
            admitted = True

    def _prefill_cache(self, request: Request):
        """(cache [1, w] of the prompt, logits of its last token), through a registered prefix where one fits."""
        ids, s = request.prompt_ids, self.max_model_len
        best = max((p for p in self._prefixes if len(p) < len(ids) and tuple(ids[:len(p)]) == p), key=len, default=None)
        if best is not None:
            rest = ids[len(best):]
            width = prompt_width(len(rest), self.min_bucket)
            prefix = self._prefix_entry(best, request.adapter)
            if prefix["segment_ids"].shape[1] + width <= s:
                return self.fns.prefill(self.params, self._pad(rest, width), np.int32(len(rest)),
                                     np.array([request.adapter], np.int32), prefix)
        width = min(prompt_width(len(ids), self.min_bucket), s)
        return self.fns.prefill(self.params, self._pad(ids, width), np.int32(len(ids)), np.array([request.adapter], np.int32))

    def _prefix_entry(self, ids: tuple[int, ...], adapter: int):
        key = (adapter, ids)
        if key not in self._prefix_cache:
            width = prompt_width(len(ids), self.min_bucket)
            self._prefix_cache[key] = self.fns.prefill(self.params, self._pad(ids, width), np.int32(len(ids)),
                                                    np.array([adapter], np.int32))[0]
        return self._prefix_cache[key]

    def _pad(self, ids: Sequence[int], width: int) -> np.ndarray:
        out = np.full((1, width), self.pad_id, np.int32)
        out[0, :len(ids)] = ids
        return out

    def _start(self, request: Request, free: list[int]) -> None:
        cache_1w, logits_v = self._prefill_cache(request)
        n = len(request.choices)
        b = self._row_bucket(n)
        seeds = np.zeros((b,), np.uint32)
        temps, top_ps = np.zeros((b,), np.float32), np.ones((b,), np.float32)
        for j, c in enumerate(request.choices):
            seeds[j], temps[j], top_ps[j] = c.seed, c.temperature, c.top_p
        first = np.asarray(jax.device_get(self.fns.first_tokens(logits_v, seeds, temps, top_ps)))
        self.stats["prompt_tokens"] += len(request.prompt_ids)
        self._fit(rows=free[n - 1] + 1, columns=int(cache_1w["segment_ids"].shape[1]))
        for j, (slot, sampling) in enumerate(zip(free[:n], request.choices)):
            self.cache = self.fns.insert(self.cache, cache_1w, np.int32(slot))
            self._index[slot] = len(request.prompt_ids)
            self.slots[slot] = _Slot(request, j, sampling, TextStream(request.decode, sampling.stop))
            self.adapters[slot], self.seeds[slot] = request.adapter, sampling.seed
            self.temperatures[slot], self.top_ps[slot] = sampling.temperature, sampling.top_p
            self._accept(slot, int(first[j]))

    def _accept(self, i: int, token: int) -> None:
        """Token `token` was generated for slot i: hand it on, and free the slot if the choice is done."""
        slot = self.slots[i]
        request = slot.request
        if request.first_token is None:
            request.first_token = time.monotonic()
            self._record_ttft(request.first_token - request.submitted)
        self.stats["generated_tokens"] += 1
        slot.ids.append(token)
        self.tokens[i], self.counters[i] = token, len(slot.ids)
        if token in self.eos_ids:
            finish, text = "stop", slot.stream.finish(slot.ids[:-1])
        else:
            text = slot.stream.push(slot.ids)
            finish = "stop" if slot.stream.stopped else None
            if finish is None and len(slot.ids) >= slot.sampling.max_tokens:
                finish, text = "length", text + slot.stream.finish(slot.ids)
        if finish is not None:
            self._free(i)
            request.open_choices -= 1
            if request.open_choices == 0:
                self.stats["requests_finished"] += 1
        self._emit(request, Event(slot.choice, text, (token,), finish))

    def _free(self, i: int) -> None:
        self.slots[i] = None
        self.temperatures[i], self.top_ps[i] = 0.0, 1.0

    def _emit(self, request: Request, event: Event) -> None:
        if request.cancelled:
            return
        try:
            request.on_event(event)
        except Exception:  # a consumer's bug must not stop the engine
            log.exception("event callback of request %d failed", request.id)

    def _record_ttft(self, seconds: float) -> None:
        self.stats["ttft_sum"] += seconds
        self.stats["ttft_count"] += 1
        for k, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[k] += 1

    # ------------------------------------------------------------------ the engine thread

    def start(self) -> "Engine":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="flacuna-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception as e:  # a failed decode step: fail what is in flight, keep serving
                log.exception("decode step failed")
                self.error = e
                self._fail_running()
                busy = False
            if not busy:
                self._wake.wait(0.5)
                self._wake.clear()

    def _fail_running(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self._free(i)
                slot.request.open_choices -= 1
                self.stats["requests_failed"] += slot.request.open_choices == 0
                self._emit(slot.request, Event(slot.choice, "", (), "error"))

    def counts(self) -> dict[str, int]:
        with self._lock:
            queued = len(self._waiting)
        return {"queued": queued, "running": sum(s is not None for s in self.slots), "slots": self.max_batch}

    # ------------------------------------------------------------------ plain calls (tests, scripts)

    def generate(self, prompt_ids: Sequence[int], choices: Sequence[Sampling], adapter: int = 0,
                 decode: Callable[[Sequence[int]], str] = lambda ids: "", timeout: float = 600.0) -> list[dict]:
        """Submits and waits (the engine thread must be running): per choice {"text", "token_ids", "finish_reason"}."""
        out = [{"text": "", "token_ids": [], "finish_reason": None} for _ in choices]
        done = threading.Event()
        remaining = [len(choices)]

        def on_event(e: Event) -> None:
            out[e.choice]["text"] += e.text
            out[e.choice]["token_ids"] += e.token_ids
            if e.finish_reason is not None:
                out[e.choice]["finish_reason"] = e.finish_reason
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        self.submit(prompt_ids, choices, on_event, decode, adapter)
        if not done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        return out


def _fitted(current: int, need: int, bucket: Callable[[int], int]) -> int:
    """A cache dimension for `need`: its bucket when it grows; half the current size or less (down to the
    smallest bucket) when a quarter of it is used, so that a size is not resized back and forth."""
    if need > current:
        return bucket(need)
    if need <= current // 4:
        return max(min(bucket(need) * 2, current), bucket(1))
    return current
