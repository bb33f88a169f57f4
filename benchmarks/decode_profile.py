"""Where a decode step's time goes on this machine: memory bandwidth, and the server's slot step by rows x width.

    python -m benchmarks.decode_profile [--model .cache/smollm2] [--grid 1x128 1x1024 8x128 8x1024] [--steps 10]
                                        [--matmul-rows 1 8 16 32] [--prefill-widths 128 384]

Prints one JSON line:
- `read_gb_per_s`: a plain sum over the model's fp32 weight bytes, in JAX and in torch (the floor of a
  batch-1 decode step is reading every weight once: `weights_mb` / that rate);
- `step_ms`: the server's jitted decode step (`serve/slots.py`, the unrolled model, cache donated) per
  "ROWSxWIDTH" (slots in use x cache columns, every row at column WIDTH/2, the slots before it
  written), best of 3 timed rounds of --steps steps: `ms` with the default kernels (the native CPU
  decode attention, `attention_cpu.py`, and projections, `matmul_cpu.py`), `xla_attention_ms` with
  XLA's attention (`Runtime.decode_attention=xla`), `xla_matmul_ms` with XLA's projections
  (`unrolled(matmul="xla")`), and `no_attention_ms` with the attention replaced by the identity: the
  differences are what attending over the cache costs;
- `attended_gb_per_s`: the written cache's bytes (rows x WIDTH/2 x layers x kv heads x head dim x 4
  bytes x 2, keys and values) over that cost, with each kernel (`native`, `xla`);
- `matmuls_ms`: per row count, every weight matrix of the model (each layer's projections and the
  output projection) applied to that many rows, one after the other, and nothing else, in JAX (one
  jitted function: `jax` with XLA's products, `native` with the projections and the output
  projection packed for `matmul_cpu`, one call per group of projections, as the model runs them) and in torch (the same fp32 weights): the floor of a decode
  step that each library's products give on this machine;
- `prefill_ms`: per width, one prompt of that many tokens through the server's prefill (`serve/slots.py`:
  the whole model, the output projection at the last position only) and through transformers' forward
  with `logits_to_keep=1` on the same ids (what `transformers serve` computes before its first token).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import numpy as np


def best_ms(fn, rounds: int = 3, steps: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1000


def versus(ms_jax: float, ms_torch: float) -> dict:
    return {"jax": round(ms_jax, 2), "torch": round(ms_torch, 2), "torch_over_jax": round(ms_torch / ms_jax, 2)}


def read_rates(n_floats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    x = jnp.ones((n_floats,), jnp.float32)
    total = jax.jit(jnp.sum)
    ms_jax = best_ms(lambda: total(x).block_until_ready())
    y = torch.ones(n_floats)
    ms_torch = best_ms(lambda: y.sum())
    gb = n_floats * 4 / 1e9
    return {"jax": round(gb / ms_jax * 1000, 1), "torch": round(gb / ms_torch * 1000, 1),
            "torch_threads": torch.get_num_threads()}


def matmul_ms(model, params, rows: int, steps: int) -> dict:
    """Every weight matrix of the model applied to `rows` rows, one after the other, JAX vs torch, each
    as its model applies it: in JAX as `model.Linear` (x @ W, W [in, out]; `native`: the packed kernel
    of `matmul_cpu`, one call per group of projections that read the same input, as `model.unrolled`
    packs them), in torch as `nn.Linear` (`F.linear`, W [out, in]). The output projection: in JAX
    `model.output_embedding` (the tied embedding, transposed in the jitted function; `native`: its
    packed copy, `model.pack_output`), in torch as transformers' `lm_head` does (x @ W^T, W [vocab,
    hidden])."""
    import jax
    import jax.numpy as jnp
    import torch

    from flacuna_jax import matmul_cpu
    from flacuna_jax.model import PROJECTION_GROUPS, pack_projections, packed_group_name

    output_weights = ("embed_tokens", "lm_head")  # applied below as the output projection
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
               if x.ndim == 2 and not any(name in jax.tree_util.keystr(path) for name in output_weights)]
    grouped = pack_projections(params)  # a new tree: `params` (unrolled, as loaded) keeps its kernels
    packed = [(w, w.shape[0] * matmul_cpu.PANEL) for w in
              (grouped[f"layers_{i}"][block][packed_group_name(names)] for i in range(model.config.num_layers)
               for block, groups in PROJECTION_GROUPS.items() for names in groups)]
    del grouped
    hidden = model.config.hidden_size
    xs = {d: jnp.full((rows, d), 0.01, jnp.float32) for d in {w.shape[0] for w in kernels} | {hidden}}

    def in_order(xs, products):
        """Each product's input waits for the previous product's sum (+ 0 x it), as in a decode step,
        where every product needs the one before: XLA would otherwise run independent products at once."""
        total = jnp.float32(0)
        for d, product in products:
            total = total + jnp.sum(product(xs[d] + 0 * total))
        return total

    @jax.jit
    def products(xs, kernels, params):
        return in_order(xs, [(w.shape[0], lambda x, w=w: x @ w) for w in kernels]
                        + [(hidden, lambda x: x @ model.output_embedding(params))])

    @functools.partial(jax.jit, static_argnums=3)
    def native_products(xs, packed, output_packed, columns):
        return in_order(xs, [(w.shape[1], lambda x, w=w, n=n: matmul_cpu.matmul(x, w, n)) for w, n in zip(packed, columns)]
                        + [(hidden, lambda x: matmul_cpu.matmul(x, output_packed, model.config.vocab_size))])

    ms_jax = best_ms(lambda: products(xs, kernels, params).block_until_ready(), steps=steps)
    weights, columns = [w for w, _ in packed], tuple(n for _, n in packed)
    output_packed = matmul_cpu.pack(model.output_embedding(params))  # as `model.pack_output` does
    ms_native = best_ms(lambda: native_products(xs, weights, output_packed, columns).block_until_ready(), steps=steps)
    t_kernels = [torch.from_numpy(np.array(w).T.copy()) for w in kernels]  # [out, in], as nn.Linear holds them
    t_head_vd = torch.from_numpy(np.array(model.output_embedding(params)).T.copy())
    t_xs = {d: torch.full((rows, d), 0.01) for d in xs}

    def t_products():
        with torch.no_grad():
            linear = torch.nn.functional.linear
            return sum(torch.sum(linear(t_xs[w.shape[1]], w)) for w in t_kernels) + torch.sum(linear(t_xs[hidden], t_head_vd))

    ms_torch = best_ms(t_products, steps=steps)
    return versus(ms_jax, ms_torch) | {"native": round(ms_native, 2), "torch_over_native": round(ms_torch / ms_native, 2)}


def step_ms(model, params, rows: int, width: int, steps: int) -> float:
    import jax.numpy as jnp

    from flacuna_jax.serve import slots

    fns = slots.compile_slot_functions(model)
    state = {"cache": slots.empty_cache(model, rows, width)}
    state["cache"]["index"] = jnp.full((rows,), width // 2, jnp.int32)
    state["cache"]["segment_ids"] = state["cache"]["segment_ids"].at[:, :width // 2].set(1)  # the written slots
    args = (np.ones((rows,), np.int32), np.ones((rows,), bool), np.zeros((rows,), np.int32), np.zeros((rows,), np.uint32),
            np.zeros((rows,), np.int32), np.zeros((rows,), np.float32), np.ones((rows,), np.float32))

    def one():
        state["cache"], tokens = fns.step(params, state["cache"], *args)
        np.asarray(tokens)

    one()  # the first call's output cache is committed to the device: a second signature, compiled here
    return best_ms(one, steps=steps)


def prefill_ms(model, params, model_dir: str, width: int, steps: int) -> dict:
    """One `width`-token prompt's prefill, ours (the server's) vs transformers' forward on the same ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from flacuna_jax.serve import slots

    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, width)).astype(np.int32)
    prefill = slots.compile_slot_functions(model).prefill
    adapter = np.zeros((1,), np.int32)
    ms_jax = best_ms(lambda: np.asarray(prefill(params, ids, np.int32(width), adapter)[1]), steps=steps)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t_ids = torch.from_numpy(ids.astype(np.int64))

    def t_prefill():
        with torch.no_grad():
            return hf(t_ids, logits_to_keep=1).logits

    ms_torch = best_ms(t_prefill, steps=steps)
    return versus(ms_jax, ms_torch)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import Load, emit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--grid", nargs="+", default=["1x128", "1x1024", "8x128", "8x1024"], help="ROWSxWIDTH cases")
    p.add_argument("--matmul-rows", type=int, nargs="*", default=[1, 8, 16, 32],
                   help="row counts for `matmuls_ms` (none: skip)")
    p.add_argument("--prefill-widths", type=int, nargs="*", default=[128, 384],
                   help="prompt lengths for `prefill_ms` (none: skip)")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)

    with Load() as load:
        out = measure(a)
    return emit(out | load.fields())


def measure(a: argparse.Namespace) -> dict:
    import jax

    from benchmarks.smollm2 import smollm2_dir
    from flacuna_jax import attention
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.model import unrolled

    model_dir = a.model or str(smollm2_dir())
    xla_matmul_model, plain_params = load_for_inference(model_dir, layers="unrolled", matmul="xla")
    model, params = unrolled(xla_matmul_model, plain_params, "native")
    n_weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(plain_params))
    c = model.config
    out: dict = {"benchmark": "decode_profile", "model": a.model or "smollm2", "weights_mb": round(n_weights * 4 / 1e6, 1),
                 "read_gb_per_s": read_rates(n_weights), "step_ms": {}}
    cases = [tuple(int(v) for v in case.split("x")) for case in a.grid]
    xla_model = model.clone(runtime=dataclasses.replace(model.runtime, decode_attention="xla"))
    for rows, width in cases:
        out["step_ms"][f"{rows}x{width}"] = {"ms": round(step_ms(model, params, rows, width, a.steps), 1),
                                             "xla_attention_ms": round(step_ms(xla_model, params, rows, width, a.steps), 1),
                                             "xla_matmul_ms": round(step_ms(xla_matmul_model, plain_params, rows, width, a.steps), 1)}
    real = attention.decode_attention
    attention.decode_attention = lambda kind, q, *cache_and_new: q  # the identity: what the step costs without attending
    try:
        for rows, width in cases:
            entry = out["step_ms"][f"{rows}x{width}"]
            entry["no_attention_ms"] = round(step_ms(model, params, rows, width, a.steps), 1)
            written_gb = rows * (width // 2) * c.num_layers * c.num_kv_heads * c.head_dim * 4 * 2 / 1e9
            entry["attended_gb_per_s"] = {
                kernel: round(written_gb / spent * 1000, 2) if (spent := entry[key] - entry["no_attention_ms"]) > 0 else None
                for kernel, key in (("native", "ms"), ("xla", "xla_attention_ms"))}
    finally:
        attention.decode_attention = real
    out["matmuls_ms"] = {str(rows): matmul_ms(xla_matmul_model, plain_params, rows, a.steps) for rows in a.matmul_rows}
    out["prefill_ms"] = {str(w): prefill_ms(model, params, model_dir, w, max(1, a.steps // 5)) for w in a.prefill_widths}
    return out


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
