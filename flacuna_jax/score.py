"""Log-likelihood of continuations given contexts: the primitive of multiple-choice evaluation.

    python -m flacuna_jax.score --model HF_DIR [--adapter PEFT_DIR | --run RUN_DIR] --data in.jsonl --out out.jsonl

Each input line is {"context": str, "continuation": str}; each output line, in the same order, is
{"loglik": float, "is_greedy": bool, "num_tokens": int}. Tokens as lm-evaluation-harness takes them:
whole = tok(context + continuation), ctx = tok(context), continuation = whole[len(ctx):].
With `--adapter` (a PEFT LoRA adapter) or `--run` (a training run's latest checkpoint), the LoRA
factors are folded into the base first, as a merged export would be (a full fine-tune's weights
replace the base's).

Requests that share a context (the choices of a question) are scored on one row: the context once,
each continuation a branch that sees only the context and itself (`Row`); only the scored positions
go through the output projection and the log-softmax over the vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax.generate import argmax
from flacuna_jax.inference import add_model_args, load_from_args
from flacuna_jax.jsonl import read_objects


class ScoreInputError(ValueError):
    pass


def read_requests(path: str | Path) -> list[tuple[str, str]]:
    out = []
    for where, rec in read_objects(path, ScoreInputError):
        if not isinstance(rec.get("context"), str) or not isinstance(rec.get("continuation"), str):
            raise ScoreInputError(f"{where}: expected {{\"context\": str, \"continuation\": str}}")
        out.append((rec["context"], rec["continuation"]))
    return out


def request_tokens(tokenizer: Any, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """(ids to feed with the scored tokens last, number of continuation tokens)."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    n_cont = len(whole) - n_ctx
    if n_ctx == 0 and n_cont > 0:
        raise ScoreInputError("empty context and a tokenizer that adds no BOS: the first token has nothing to condition on")
    if n_cont > max_len:  # lm-evaluation-harness asserts the same: no window holds every scored token
        raise ScoreInputError(f"the continuation is {n_cont} tokens, longer than the model's context window of "
                              f"{max_len} tokens")
    return whole[-(max_len + 1):], n_cont  # keep the end: the context is cut from the left, as lm-eval does


def bucket(n: int, minimum: int = 16) -> int:
    """n rounded up to a width of 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...: four compiled widths per
    doubling, at most 25% padding."""
    if n <= minimum:
        return minimum
    step = max(1 << (n - 1).bit_length() - 3, minimum // 4)
    return -(-n // step) * step


def power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class Row:
    """One model row: a context (the trunk), then each request's continuation but its last token (a
    branch), every branch seeing the trunk and itself only. The trunk's last position predicts every
    branch's first scored token, so choices of one question cost their context once."""

    trunk: list[int]
    requests: list[int] = field(default_factory=list)  # indices into the request list
    branches: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.trunk) + sum(len(b) for b in self.branches)

    @property
    def slots(self) -> int:
        return sum(len(t) for t in self.targets)


def plan_rows(toks: Sequence[tuple[Sequence[int], int]], max_width: int) -> list[Row]:
    """Requests (ids, n: score the last n) grouped by everything before their scored tokens; a group's
    branches fill rows of at most `max_width` tokens (a request alone always fits: its own width)."""
    rows: list[Row] = []
    open_rows: dict[tuple[int, ...], Row] = {}
    for i, (ids, n) in enumerate(toks):
        ids = [int(x) for x in ids]
        if not 0 < n < len(ids):
            raise ValueError(f"request {i + 1}: {n} scored tokens need at least {n + 1} ids, got {len(ids)}")
        key = tuple(ids[:len(ids) - n])
        branch = ids[len(ids) - n:-1]
        row = open_rows.get(key)
        if row is None or (row.requests and row.width + len(branch) > max_width):
            row = open_rows[key] = Row(list(key))
            rows.append(row)
        row.requests.append(i)
        row.branches.append(branch)
        row.targets.append(ids[len(ids) - n:])
    return rows


def row_arrays(rows: Sequence[Row], batch: int, width: int, slots: int) -> dict[str, np.ndarray]:
    """The scorer's inputs for <= batch rows: ids, positions, branch ids (0 trunk, j > 0 the j-th branch,
    -1 padding), the positions whose next-token log-probabilities are read, and their targets."""
    out = {"ids": np.zeros((batch, width), np.int32), "positions": np.zeros((batch, width), np.int32),
           "branch": np.full((batch, width), -1, np.int32), "slots": np.zeros((batch, slots), np.int32),
           "targets": np.zeros((batch, slots), np.int32)}
    for r, row in enumerate(rows):
        p = len(row.trunk)
        out["ids"][r, :p], out["positions"][r, :p], out["branch"][r, :p] = row.trunk, np.arange(p), 0
        at, slot = p, 0
        for j, (branch, targets) in enumerate(zip(row.branches, row.targets), 1):
            end = at + len(branch)
            out["ids"][r, at:end], out["positions"][r, at:end], out["branch"][r, at:end] = branch, np.arange(p, p + len(branch)), j
            out["slots"][r, slot:slot + len(targets)] = [p - 1, *range(at, end)]
            out["targets"][r, slot:slot + len(targets)] = targets
            at, slot = end, slot + len(targets)
    return out


@functools.lru_cache(maxsize=8)
def make_token_scorer(model: Any):
    """jit fn(params, ids, positions, branch [b, t], slots, targets [b, m]) -> (log p of each target given
    everything its branch sees, is it the argmax) [b, m].

    Only the `slots` positions go through the output projection and the fp32 log-softmax over the
    vocabulary. Cached per model (linen modules hash by their fields): in-training evaluation scores
    every `eval.every` steps and must reuse the compiled scorer rather than build a new jit each time.
    """

    @jax.jit
    def score(params, ids_bt, positions_bt, branch_bt, slots_bm, targets_bm):
        t = ids_bt.shape[1]
        real_bt = branch_bt >= 0
        trunk_or_same_bts = (branch_bt[:, None, :] == 0) | (branch_bt[:, None, :] == branch_bt[:, :, None])
        causal_ts = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        mask_bts = trunk_or_same_bts & real_bt[:, None, :] & causal_ts[None]
        logits_bmv = model.apply({"params": params}, ids_bt, positions_bt, real_bt.astype(jnp.int32),
                                 mask_bts=mask_bts, logits_at_bm=slots_bm).astype(jnp.float32)
        logp_bmv = jax.nn.log_softmax(logits_bmv, axis=-1)
        target_logp = jnp.take_along_axis(logp_bmv, targets_bm[..., None], axis=-1)[..., 0]
        return target_logp, argmax(logits_bmv) == targets_bm

    return score


def score_requests(model: Any, params: Any, tokenizer: Any, requests: Iterable[tuple[str, str]],
                   batch_size: int = 8) -> list[dict]:
    max_len = model.config.max_position_embeddings
    toks = []
    for i, (context, continuation) in enumerate(requests, 1):
        try:
            toks.append(request_tokens(tokenizer, context, continuation, max_len))
        except ScoreInputError as e:
            raise ScoreInputError(f"request {i}: {e}") from None
    return score_token_requests(model, params, toks, batch_size)


def score_token_requests(model: Any, params: Any, toks: Sequence[tuple[Sequence[int], int]],
                         batch_size: int = 8) -> list[dict]:
    """Scores pre-tokenized requests: (ids, n) scores the last n of ids, each given all before it.

    ids must fit the window (at most max_position_embeddings + 1); results come back in input order.
    Requests that share everything before their scored tokens (the choices of a multiple-choice
    question) share one row: that context is computed once (`Row`). Rows go `batch_size` at a time,
    longest first, padded to a bucketed width (`bucket`); a last, partial batch to a power of two rows.
    """
    results: list[dict] = [None] * len(toks)  # type: ignore[list-item]
    scored = []
    for i, (ids, n) in enumerate(toks):
        if not 0 <= n < len(ids):
            raise ValueError(f"request {i + 1}: {n} scored tokens need at least {n + 1} ids, got {len(ids)}")
        if n == 0:  # nothing to score
            results[i] = {"loglik": 0.0, "is_greedy": True, "num_tokens": 0}
        else:
            scored.append(i)
    window = model.config.max_position_embeddings + 1
    rows = plan_rows([toks[i] for i in scored], window)
    rows.sort(key=lambda r: -r.width)  # similar widths batch together
    scorer = make_token_scorer(model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        arrays = row_arrays(chunk, power_of_two(len(chunk)) if len(chunk) < batch_size else batch_size,
                            bucket(max(r.width for r in chunk)), power_of_two(max(r.slots for r in chunk), 8))
        logp, greedy = jax.device_get(scorer(params, *(jnp.asarray(arrays[k]) for k in
                                                       ("ids", "positions", "branch", "slots", "targets"))))
        for r, row in enumerate(chunk):
            slot = 0
            for i, targets in zip(row.requests, row.targets):
                sl = slice(slot, slot + len(targets))
                results[scored[i]] = {"loglik": float(logp[r, sl].sum(dtype=np.float64)),
                                      "is_greedy": bool(greedy[r, sl].all()), "num_tokens": len(targets)}
                slot += len(targets)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="input JSONL: {\"context\": str, \"continuation\": str} per line")
    p.add_argument("--out", required=True, help="output JSONL: {\"loglik\", \"is_greedy\", \"num_tokens\"} per line")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> None:
    from flacuna_jax.tokenizer import load_tokenizer

    a = build_parser().parse_args(argv)
    try:
        requests = read_requests(a.data)
        tokenizer = load_tokenizer(a.tokenizer or a.model)
        model, params = load_from_args(a)
        results = score_requests(model, params, tokenizer, requests, a.batch_size)
    except (ValueError, OSError) as e:  # our input errors are ValueErrors; a missing file an OSError
        sys.exit(f"error: {e}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"scored {len(results)} requests -> {out}")


if __name__ == "__main__":
    main()
