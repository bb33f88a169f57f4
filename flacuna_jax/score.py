"""Log-likelihood of continuations given contexts: the primitive of multiple-choice evaluation.

    python -m flacuna_jax.score --model HF_DIR [--adapter PEFT_DIR | --run RUN_DIR] --data in.jsonl --out out.jsonl

Each input line is {"context": str, "continuation": str}; each output line, in the same order, is
{"loglik": float, "is_greedy": bool, "num_tokens": int}. Tokens as lm-evaluation-harness takes them:
whole = tok(context + continuation), ctx = tok(context), continuation = whole[len(ctx):].
With `--adapter` (a PEFT LoRA adapter) or `--run` (a training run's latest checkpoint), the LoRA
factors are folded into the base first, as a merged export would be (a full fine-tune's weights
replace the base's).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

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


def _bucket(n: int, step: int = 32) -> int:
    return -(-n // step) * step


@functools.lru_cache(maxsize=8)
def make_token_scorer(model: Any):
    """jit fn(params, ids [b, t+1]) -> (log p of each next token, is it the argmax) [b, t].

    Cached per model (linen modules hash by their fields): in-training evaluation scores every
    `eval.every` steps and must reuse the compiled scorer rather than build a new jit each time.
    """

    @jax.jit
    def score(params, ids):
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits = model.apply({"params": params}, inputs).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logits, axis=-1) == targets

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
    scorer = make_token_scorer(model)
    results: list[dict] = [None] * len(toks)  # type: ignore[list-item]
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i][0]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = min(_bucket(max(len(toks[i][0]) for i in idx)), max_len + 1)
        ids = np.zeros((batch_size, width), np.int32)  # fixed batch and bucketed width: few compiles
        for row, i in enumerate(idx):
            ids[row, :len(toks[i][0])] = toks[i][0]
        logp, greedy = jax.device_get(scorer(params, jnp.asarray(ids)))
        for row, i in enumerate(idx):
            seq, n = toks[i]
            sl = slice(len(seq) - 1 - n, len(seq) - 1)
            results[i] = {"loglik": float(logp[row, sl].sum(dtype=np.float64)),
                          "is_greedy": bool(greedy[row, sl].all()), "num_tokens": n}
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
