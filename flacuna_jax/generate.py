"""Text generation with the KV cache: one prompt, a JSONL file of prompts, or a chat REPL.

    python -m flacuna_jax.generate --model HF_DIR [--adapter PEFT_DIR | --run RUN_DIR] \\
        (--prompt TEXT | --data in.jsonl --out out.jsonl | --chat) \\
        [--max-new-tokens 256] [--temperature 0] [--top-p 1.0] [--seed 0] [--raw] [--dtype float32]

Prompts are rendered with the Vicuna v1.1 template (`templates.encode_generation_prompt`, the ids
training saw) unless `--raw`. Temperature 0 is greedy; otherwise temperature + nucleus (top-p).

How decoding runs. A batch of prompts is LEFT-padded to a bucketed width (`batch_prompt_width`:
few compiles) with segment id 0 on the padding and positions counted from each row's first real token
(HF's attention_mask / position_ids in `generate`). One jitted function does the prefill (only its
last position goes through the output projection), then the whole token loop as one `lax.while_loop`
over a cache of width + max_new_tokens slots (`kv_cache.py`, written in place); the loop stops when
every row has emitted EOS (rows that finished emit `pad_id`). Nothing returns to Python between
tokens. With the model in the unrolled layout (`model.unrolled`, what the CLI loads) each decode step
reads every layer's weights where they lie instead of copying them out of a stacked array first.

Shared prefixes. Few-shot evaluation prompts of one task start with the same header and shots (MMLU:
~90% of each prompt), and sampled rows repeat one prompt. `plan_batches` orders prompts so that such
prompts batch together; when a run of prompts shares at least `MIN_SHARED` leading tokens, that
prefix is prefilled once, as one row, for all the run's batches, its keys/values are copied into
every row's cache, and each row prefills only its rest (left-padded after the prefix, positions
continuing from it). The attention is the same computation over the same keys, so the tokens are
those of the full prefill (tests compare both).

Streaming (--prompt/--chat) uses an ordered `jax.debug.callback` inside the loop, compiled in only
when a sink is given: each step hands the new token ids to the host, which decodes row 0
incrementally and prints the new text. On an accelerator this costs a host round trip per token,
acceptable for interactive use; batch generation (--data) compiles the loop without it. A chunked
loop (return to Python every k tokens) would stream in bursts and needs the cache carried across
calls; the callback keeps the one-loop structure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import greedy_cpu
from flacuna_jax.inference import add_model_args, load_from_args
from flacuna_jax.jsonl import read_objects
from flacuna_jax.kv_cache import in_place_options, init_cache, prepend_prefix

TokenSink = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens_b, done_before_b)


# ------------------------------------------------------------------------------ sampling

ARGMAX_BLOCK = 1024


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32: the first index of the maximum, a NaN counting as the maximum.

    In two passes over blocks of 1024: each block's maximum, the first block holding the largest, then
    the first index of it within that block. XLA's CPU argmax is one sequential (value, index)
    reduction: SmolLM2's 16 x 49,152 logits took 1.14 ms, the two passes 0.22 ms. XLA's CPU max does
    not propagate NaN, so a block holding one (its sum is NaN; so is a block with +inf and -inf)
    sends the whole call to jnp.argmax. Padding is -inf, found first only where the whole row is
    -inf, as jnp.argmax's 0 is.
    """
    v = x.shape[-1]
    if v <= ARGMAX_BLOCK:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    n = -(-v // ARGMAX_BLOCK)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * ARGMAX_BLOCK - v)], constant_values=-jnp.inf)
    blocks = padded.reshape(*x.shape[:-1], n, ARGMAX_BLOCK)

    def by_blocks():
        block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
        within = jnp.argmax(jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :], axis=-1)
        return (block * ARGMAX_BLOCK + within).astype(jnp.int32)

    return jax.lax.cond(jnp.isnan(jnp.sum(blocks, axis=-1)).any(), lambda: jnp.argmax(x, axis=-1).astype(jnp.int32),
                        by_blocks)


def warp_logits(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """The logits sampling draws from: transformers' TemperatureLogitsWarper, then TopPLogitsWarper.

    Divided by the temperature first (so it changes which tokens the nucleus keeps), then the
    nucleus exactly as transformers computes it: sort ascending, and drop each token whose
    cumulative probability from the least probable one up to itself is <= 1 - top_p; the top token
    always stays. Equal logits at the cut: the higher token id is kept (transformers' ascending
    sort order when it is stable; torch's is, on small vocabularies). top_p >= 1 keeps every token,
    as transformers then adds no top-p warper. `temperature` and `top_p` are scalars or one per row.
    """
    temperature, top_p = (jnp.asarray(x, jnp.float32) for x in (temperature, top_p))
    temperature, top_p = (x[:, None] if x.ndim else x for x in (temperature, top_p))
    scaled_bv = logits_bv.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order_bv = jnp.argsort(scaled_bv, axis=-1, stable=True)  # ascending, ties by id
    sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
    cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    drop_sorted_bv = (cum_bv <= 1 - top_p).at[:, -1].set(False)
    drop_bv = jnp.zeros_like(drop_sorted_bv).at[jnp.arange(drop_sorted_bv.shape[0])[:, None], order_bv].set(
        drop_sorted_bv)
    return jnp.where(drop_bv & (top_p < 1), -jnp.inf, scaled_bv)


def sample_next(logits_bv: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token [b]: argmax when temperature == 0, else a draw from `warp_logits` (temperature,
    then nucleus top-p, as transformers' `generate(do_sample=True)`). A `lax.cond` on the (traced)
    temperature skips the vocabulary sort when decoding greedily.
    """
    logits_bv = logits_bv.astype(jnp.float32)

    def greedy(_):
        return argmax(logits_bv)

    def nucleus(_):
        return jax.random.categorical(rng, warp_logits(logits_bv, temperature, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None)


def sample_rows(logits_bv: jax.Array, keys_b: jax.Array, temperature_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Next token [b] with each row's own key, temperature and top_p (the server's decode slots):
    row i is `sample_next(logits_bv[i:i+1], keys_b[i], temperature_b[i], top_p_b[i])`. When no row
    samples, only the argmax runs (no vocabulary sort)."""

    def per_row(_):
        return jax.vmap(lambda l_v, key, t, p: sample_next(l_v[None], key, t, p)[0])(logits_bv, keys_b, temperature_b, top_p_b)

    def greedy(_):
        return argmax(logits_bv.astype(jnp.float32))

    return jax.lax.cond(jnp.any(temperature_b > 0), per_row, greedy, None)


def greedy_from_hidden(h_bd: jax.Array, params: dict, vocab_size: int, needed_b: jax.Array | None = None) -> jax.Array:
    """The greedy token [b] of the final hidden states `h_bd` of a model packed for the CPU kernels
    (`greedy_cpu.usable(params)`): the float logits' argmax, settled by the greedy screen without
    computing them; they are computed where the screen could not settle a row that is `needed_b`
    (default: every row; a finished row's or a free slot's token is thrown away)."""
    tokens_b = greedy_cpu.screen_tokens(h_bd, params)
    unsettled_b = tokens_b < 0 if needed_b is None else (tokens_b < 0) & needed_b
    return jax.lax.cond(jnp.any(unsettled_b), lambda: argmax(greedy_cpu.logits(h_bd, params, vocab_size)),
                        lambda: tokens_b)


def sample_from_hidden(h_bd: jax.Array, params: dict, vocab_size: int, rng: jax.Array, temperature: jax.Array,
                       top_p: jax.Array, needed_b: jax.Array | None = None) -> jax.Array:
    """`sample_next` on the logits of `h_bd`, a greedy step through `greedy_from_hidden`."""
    return jax.lax.cond(
        temperature > 0, lambda: sample_next(greedy_cpu.logits(h_bd, params, vocab_size), rng, temperature, top_p),
        lambda: greedy_from_hidden(h_bd, params, vocab_size, needed_b))


def sample_rows_from_hidden(h_bd: jax.Array, params: dict, vocab_size: int, keys_b: jax.Array,
                            temperature_b: jax.Array, top_p_b: jax.Array, needed_b: jax.Array | None = None) -> jax.Array:
    """`sample_rows` on the logits of `h_bd`, a step where no row samples through `greedy_from_hidden`."""
    return jax.lax.cond(
        jnp.any(temperature_b > 0),
        lambda: sample_rows(greedy_cpu.logits(h_bd, params, vocab_size), keys_b, temperature_b, top_p_b),
        lambda: greedy_from_hidden(h_bd, params, vocab_size, needed_b))


# ------------------------------------------------------------------------------ batching

def bucket_width(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (at least `minimum`): prompt widths share few compiled shapes."""
    width = minimum
    while width < n:
        width *= 2
    return width


def batch_prompt_width(n: int, minimum: int = 16) -> int:
    """The next of 16, 24, 32, 48, 64, 96, ... >= n (powers of two and 1.5 times them; at least
    `minimum`): what a batch of prompts is padded to. Twice the compiled shapes of `bucket_width`,
    for at most a third of the prefill padding rather than half (lm-eval's 13-24-token prompts: 24
    columns, not 32; the prefill is a fifth of such a batch's time). The server pads one prompt at a
    time by its own rule (`serve.engine.prompt_width`)."""
    width = bucket_width(n, minimum)
    return width * 3 // 4 if width > minimum and width * 3 // 4 >= n else width


def left_pad(prompts: Sequence[Sequence[int]], width: int, batch: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [batch, width], segment ids [batch, width]); missing rows repeat the last prompt."""
    ids_bt = np.full((batch, width), pad_id, np.int32)
    seg_bt = np.zeros((batch, width), np.int32)
    for row in range(batch):
        p = prompts[min(row, len(prompts) - 1)]
        if not 0 < len(p) <= width:
            raise ValueError(f"prompt of {len(p)} tokens does not fit width {width}")
        ids_bt[row, width - len(p):] = p
        seg_bt[row, width - len(p):] = 1
    return ids_bt, seg_bt


MIN_SHARED = 32  # shorter common prefixes are not worth a second prefill call


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Number of leading ids every prompt shares."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


def shared_prefix_len(prompts: Sequence[Sequence[int]], minimum: int = MIN_SHARED) -> int:
    """The prefix a batch prefills once: the common prefix, less the last id of the shortest prompt
    (every row needs one id of its own to predict from); 0 when under `minimum` or a single row."""
    if len(prompts) < 2:
        return 0
    n = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    return n if n >= minimum else 0


@dataclass(frozen=True)
class Batch:
    """Prompt indices decoded together, and how many leading ids they all share and prefill once."""

    indices: list[int]
    shared: int = 0


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int, minimum: int = MIN_SHARED) -> list[Batch]:
    """Batches of <= batch_size prompts. Prompts sharing >= `minimum` leading ids form a run (sorted
    order puts them next to each other); a run's batches all share the run's prefix, so it is prefilled
    once for the whole run (`Generator`), and within a run prompts go by length (similar widths)."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    runs: list[list[int]] = []
    for i in order:
        if runs and common_prefix_len([prompts[runs[-1][-1]], prompts[i]]) >= minimum:
            runs[-1].append(i)
        else:
            runs.append([i])
    batches = []
    for run in (r for r in runs if len(r) > 1):
        shared = shared_prefix_len([prompts[i] for i in run], minimum)
        run = sorted(run, key=lambda i: len(prompts[i]))
        batches += [Batch(run[s:s + batch_size], shared) for s in range(0, len(run), batch_size)]
    singles = sorted((r[0] for r in runs if len(r) == 1), key=lambda i: len(prompts[i]))
    return batches + [Batch(singles[s:s + batch_size]) for s in range(0, len(singles), batch_size)]


# ------------------------------------------------------------------------------ the compiled loop

@dataclass(frozen=True)
class DecodeSpec:
    """Static settings of one compiled decoder."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    stream: bool = False
    collect_logits: bool = False  # also return the logits each token was chosen from (tests)


def make_prefill(model: Any):
    """jit fn(params, ids_1p, segment_ids_1p) -> the [1, p] (left-padded) prefix's KV cache, for
    `make_decoder`'s `prefix`."""

    def prefill(params, ids_1p, segment_ids_1p):
        positions_1p = jnp.maximum(jnp.cumsum(segment_ids_1p, axis=1) - 1, 0).astype(jnp.int32)
        cache = init_cache(model.config, 1, ids_1p.shape[1], model.runtime.compute_dtype, model.runtime.layers)
        return model.apply({"params": params}, ids_1p, positions_1p, segment_ids_1p, cache=cache)[1]

    return jax.jit(prefill)


def make_decoder(model: Any, spec: DecodeSpec, sink: TokenSink | None = None):
    """jit fn(params, ids_bt, segment_ids_bt, rng, temperature, top_p, max_steps=None, stop_table=None,
    prefix=None) -> dict.

    `prefix`: a prefilled prefix's cache (`make_prefill`), shared by every row: ids_bt is then each
    row's rest, its positions continuing after the prefix's real tokens. Returns {"tokens": [b, max_new]
    (pad_id after EOS), "steps": number of loop iterations, and "logits": [b, max_new, vocab] when
    collect_logits}. A traced `max_steps` (<= max_new) stops the loop earlier: one compiled decoder
    serves every shorter limit (evaluation's 2, 8 and 32).
    `stop_table` [vocab, S] is a token-level automaton per row (state 0 at the start, state =
    stop_table[token, state]): a row also ends, like at EOS, once it reaches the last state S - 1
    (HumanEval's "a blank line after the code", `evals.humaneval.stop_table`).
    """
    if spec.stream and sink is None:
        raise ValueError("stream=True needs a sink")
    n_new = spec.max_new_tokens
    eos = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)

    def decode(params, ids_bt, segment_ids_bt, rng, temperature, top_p, max_steps=None, stop_table=None, prefix=None):
        limit = n_new if max_steps is None else jnp.minimum(max_steps, n_new)
        b, width = ids_bt.shape
        variables = {"params": params}
        positions_bt = jnp.maximum(jnp.cumsum(segment_ids_bt, axis=1) - 1, 0).astype(jnp.int32)
        cache = init_cache(model.config, b, width + n_new, model.runtime.compute_dtype, model.runtime.layers)
        if prefix is not None:  # the prefix's slots first, then the rows' own
            cache = prepend_prefix(prefix, cache)
            positions_bt = positions_bt + jnp.sum(prefix["segment_ids"])
        # With the greedy screen, the loop carries the final hidden state and draws from it; else the logits.
        screened = not spec.collect_logits and greedy_cpu.usable(params) is None
        carried = "hidden" if screened else "logits"
        last_b1 = jnp.full((b, 1), width - 1, jnp.int32)  # left padding: the last slot is real
        out_b1x, cache = model.apply(variables, ids_bt, positions_bt, segment_ids_bt, cache=cache,
                                     logits_at_bm=last_b1, return_hidden=screened)  # that slot only
        state = {
            "step": jnp.zeros((), jnp.int32),
            "tokens": jnp.full((b, n_new), spec.pad_id, jnp.int32),
            "cache": cache,
            carried: out_b1x[:, 0].astype(jnp.float32),
            "done": jnp.zeros((b,), bool),
            "position": positions_bt[:, -1] + 1,
            "rng": rng,
        }
        if spec.collect_logits:
            state["all_logits"] = jnp.zeros((b, n_new, model.config.vocab_size), jnp.float32)
        if stop_table is not None:
            state["stop_state"] = jnp.zeros((b,), jnp.int32)

        def cond(s):
            return (s["step"] < limit) & ~jnp.all(s["done"])

        def body(s):
            rng, key = jax.random.split(s["rng"])
            if screened:
                token_b = sample_from_hidden(s["hidden"], params, model.config.vocab_size, key, temperature, top_p,
                                             needed_b=~s["done"])
            else:
                token_b = sample_next(s["logits"], key, temperature, top_p)
            token_b = jnp.where(s["done"], spec.pad_id, token_b)
            if spec.stream:
                jax.debug.callback(sink, s["step"], token_b, s["done"], ordered=True)
            out = dict(s, rng=rng, step=s["step"] + 1, done=s["done"] | jnp.isin(token_b, eos),
                       tokens=s["tokens"].at[:, s["step"]].set(token_b), position=s["position"] + 1)
            if spec.collect_logits:
                out["all_logits"] = s["all_logits"].at[:, s["step"]].set(s["logits"])
            if stop_table is not None:
                out["stop_state"] = stop_table[token_b, s["stop_state"]].astype(jnp.int32)
                out["done"] = out["done"] | (out["stop_state"] == stop_table.shape[1] - 1)
            out_b1x, out["cache"] = model.apply(variables, token_b[:, None], s["position"][:, None],
                                                jnp.ones((b, 1), jnp.int32), cache=s["cache"], return_hidden=screened)
            out[carried] = out_b1x[:, 0].astype(jnp.float32)
            return out

        final = jax.lax.while_loop(cond, body, state)
        result = {"tokens": final["tokens"], "steps": final["step"]}
        if spec.collect_logits:
            result["logits"] = final["all_logits"]
        return result

    return jax.jit(decode, compiler_options=in_place_options())  # the loop writes its cache in place


@functools.lru_cache(maxsize=8)
def shared_prefill(model: Any):
    return make_prefill(model)


@functools.lru_cache(maxsize=16)
def shared_decoder(model: Any, spec: DecodeSpec):
    """A non-streaming decoder shared by every Generator of an equal model (linen modules hash by
    their fields): a second Generator, e.g. the next evaluation run in one process, reuses the compile."""
    return make_decoder(model, spec)


def trim_completion(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Generated ids up to and including the first EOS (the padding after it dropped)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


def stop_length(tokens: Sequence[int], stop_table: np.ndarray) -> int:
    """How many of `tokens` the decoder kept under `stop_table`: up to and including the token that
    reached its last state (all of them if none did)."""
    state, final = 0, stop_table.shape[1] - 1
    for n, t in enumerate(tokens, 1):
        state = int(stop_table[int(t), state])
        if state == final:
            return n
    return len(tokens)


class Generator:
    """Batched generation for one (model, params); compiled decoders are cached per setting."""

    def __init__(self, model: Any, params: Any, eos_ids: Sequence[int] | None = None, pad_id: int = 0,
                 batch_size: int = 8):
        self.model, self.params, self.pad_id, self.batch_size = model, params, pad_id, batch_size
        if eos_ids is None:
            eos_ids = () if model.config.eos_token_id is None else (model.config.eos_token_id,)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self._decoders: dict[tuple, Any] = {}
        self._sink: TokenSink | None = None
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # the last prefix prefilled, and its cache

    def _route(self, step, tokens_b, done_b):  # the one callback compiled in; forwards to the current sink
        if self._sink is not None:
            self._sink(int(step), np.asarray(tokens_b), np.asarray(done_b))

    def decoder(self, max_new_tokens: int, stream: bool = False, collect_logits: bool = False):
        spec = DecodeSpec(max_new_tokens, self.eos_ids, self.pad_id, stream, collect_logits)
        if spec not in self._decoders:
            self._decoders[spec] = make_decoder(self.model, spec, self._route) if stream else shared_decoder(self.model, spec)
        return self._decoders[spec]

    def prefix_cache(self, ids: Sequence[int]) -> Any:
        """The KV cache of `ids` as a shared prefix; the last one is kept, so the batches of one run
        (`plan_batches`) prefill their prefix once."""
        key = tuple(int(i) for i in ids)
        if self._prefix is None or self._prefix[0] != key:
            ids_1p, seg_1p = left_pad([key], bucket_width(len(key)), 1, self.pad_id)
            self._prefix = key, shared_prefill(self.model)(self.params, jnp.asarray(ids_1p), jnp.asarray(seg_1p))
        return self._prefix[1]

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, sink: TokenSink | None = None,
                     capacity: int | None = None, stop_table: np.ndarray | None = None,
                     shared: int | None = None) -> list[list[int]]:
        """Completion ids per prompt (in input order), each ending at its EOS if one was produced.

        Prompts are batched by `plan_batches` and decoded `batch_size` at a time, a shared prefix
        prefilled once (module docstring); `shared` (one batch of prompts) gives that prefix's
        length, as the caller's own plan decided it. A sink streams batch 0.
        `capacity` (>= max_new_tokens) compiles the decoder for that many new tokens and stops it at
        max_new_tokens, so calls with different limits share one compiled loop. `stop_table`: see
        `make_decoder` (a row may end before EOS; its ids end there).
        """
        table = None if stop_table is None else jnp.asarray(stop_table)
        out: list[list[int]] = [[] for _ in prompts]
        rng = jax.random.key(seed)
        plan = plan_batches(prompts, self.batch_size) if shared is None else [Batch(list(range(len(prompts))), shared)]
        for planned in plan:
            idx = planned.indices
            batch = [prompts[i] for i in idx]
            prefix = None
            if planned.shared and len(prompts) > 1:
                prefix = self.prefix_cache(batch[0][:planned.shared])
                batch = [p[planned.shared:] for p in batch]
            width = batch_prompt_width(max(len(p) for p in batch))
            ids_bt, seg_bt = left_pad(batch, width, self.batch_size if len(prompts) > 1 else 1, self.pad_id)
            self._sink = sink
            try:
                decode = self.decoder(max(max_new_tokens, capacity or 0), stream=sink is not None)
                rng, key = jax.random.split(rng)
                result = decode(self.params, jnp.asarray(ids_bt), jnp.asarray(seg_bt), key,
                                jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens), table, prefix)
                tokens_bn = np.asarray(jax.device_get(result["tokens"]))[:, :max_new_tokens]
                if sink is not None:
                    jax.effects_barrier()  # every streamed token has reached the sink
            finally:
                self._sink = None
            for row, i in enumerate(idx):
                out[i] = trim_completion(tokens_bn[row], self.eos_ids)
                if stop_table is not None:
                    out[i] = out[i][:stop_length(out[i], stop_table)]
        return out


# ------------------------------------------------------------------------------ text in, text out

class Codec:
    """Prompt text -> ids (template or raw) and generated ids -> text.

    Generated ids are decoded with the template's tokenizer (`templates.SegmentTokenizer`), the
    inverse of the ids training saw; the answer's leading space is dropped, as FastChat strips it.
    """

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int] = ()):
        from flacuna_jax.templates import SegmentTokenizer

        self.tokenizer, self.segments = tokenizer, SegmentTokenizer.load(tokenizer)
        self.eos_ids = set(eos_ids) | {self.segments.eos_id}

    def prompt(self, text: str, raw: bool = False, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Vicuna v1.1 generation prompt (after the chat history), or the raw text with BOS."""
        if raw:
            return list(self.tokenizer(text)["input_ids"])
        from flacuna_jax.templates import encode_generation_prompt

        return encode_generation_prompt(list(history), text, self.segments)

    def text(self, ids: Sequence[int]) -> str:
        return self.segments.decode([int(i) for i in ids if int(i) not in self.eos_ids]).lstrip()


class TextStreamer:
    """A sink printing row 0's new text as tokens arrive (incremental decode, held back mid-character)."""

    def __init__(self, codec: Codec, out=None):
        self.codec, self.out, self.ids, self.shown = codec, out or sys.stdout, [], ""

    def __call__(self, step: int, tokens_b: np.ndarray, done_b: np.ndarray) -> None:
        if done_b[0]:
            return
        self.ids.append(int(tokens_b[0]))
        text = self.codec.text(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
        self.shown = text

    def finish(self, completion: Sequence[int]) -> str:
        """Prints what the stream has not shown yet and a newline; returns the whole text."""
        text = self.codec.text(completion)
        self.out.write((text[len(self.shown):] if text.startswith(self.shown) else "") + "\n")
        self.out.flush()
        return text


def read_prompts(path: str | Path) -> list[str]:
    prompts = []
    for where, rec in read_objects(path):
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f'{where}: expected {{"prompt": str}}')
        prompts.append(rec["prompt"])
    return prompts


def chat(gen: Generator, codec: Codec, args: argparse.Namespace, inp=None, out=None) -> list[tuple[str, str]]:
    """REPL keeping the multi-turn history; `/reset` clears it, `/exit` or EOF ends. Returns the history."""
    inp, out = inp or sys.stdin, out or sys.stdout
    history: list[tuple[str, str]] = []
    limit = gen.model.config.max_position_embeddings - args.max_new_tokens
    while True:
        out.write("USER: ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            return history
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            history = []
            continue
        ids = codec.prompt(message, args.raw, history)
        while len(ids) > limit and history:  # forget the oldest turns first
            history = history[1:]
            ids = codec.prompt(message, args.raw, history)
        out.write("ASSISTANT: ")
        streamer = TextStreamer(codec, out)
        [completion] = gen.generate_ids([ids], args.max_new_tokens, args.temperature, args.top_p,
                                        args.seed + len(history), sink=streamer)
        history.append((message, streamer.finish(completion)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt; the answer streams to stdout")
    mode.add_argument("--data", help='input JSONL, {"prompt": str} per line (needs --out)')
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--out", help='output JSONL: {"prompt", "completion", "tokens"} per line')
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt text as is (BOS added)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together with --data")
    return p


def main(argv: list[str] | None = None) -> None:
    from flacuna_jax.tokenizer import load_tokenizer

    a = build_parser().parse_args(argv)
    if a.data and not a.out:
        sys.exit("error: --data needs --out")
    if a.max_new_tokens < 1 or a.temperature < 0 or not 0 < a.top_p <= 1:
        sys.exit("error: need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    try:
        tokenizer = load_tokenizer(a.tokenizer or a.model)
        model, params = load_from_args(a)
        prompts = read_prompts(a.data) if a.data else []
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    gen = Generator(model, params, eos_ids=(eos,), pad_id=tokenizer.pad_token_id or 0, batch_size=a.batch_size)
    codec = Codec(tokenizer, gen.eos_ids)
    if a.chat:
        chat(gen, codec, a)
    elif a.prompt is not None:
        streamer = TextStreamer(codec)
        [completion] = gen.generate_ids([codec.prompt(a.prompt, a.raw)], a.max_new_tokens,
                                        a.temperature, a.top_p, a.seed, sink=streamer)
        streamer.finish(completion)
    else:
        completions = gen.generate_ids([codec.prompt(t, a.raw) for t in prompts], a.max_new_tokens,
                                       a.temperature, a.top_p, a.seed)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for text, toks in zip(prompts, completions):
                f.write(json.dumps({"prompt": text, "completion": codec.text(toks), "tokens": toks}) + "\n")
        print(f"generated {len(prompts)} completions -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
