"""Speed of a quantized frozen base: LoRA train-step and scoring tokens/s, NF4 and int8 vs a bf16 base, one run.

    .venv/bin/python -m benchmarks.qlora [--model HF_DIR] [--seq 256] [--batch 2] [--steps 3]

Prints one JSON line. Every base stores its decoder projections differently (bf16; NF4 as
bitsandbytes, 0.56 bytes a weight; int8, 1 byte) and computes in fp32 (`--compute`), so the ratio is
the cost of dequantizing inside the matmul. The train step is `step.loss_sum` differentiated in the
LoRA factors (r=8 on q_proj, v_proj); scoring is the forward pass alone. Times are the best of
`--steps` after a compile-and-warm-up call. Without --model: a synthetic 4-layer model (d 512,
intermediate 1536, vocab 4096; every input size a multiple of NF4's block of 64).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_seconds
from flacuna_jax import hf, tiny
from flacuna_jax.lora import init_lora_params, merge_params
from flacuna_jax.model import LlamaConfig, LoraSpec, Runtime
from flacuna_jax.step import loss_sum

SYNTHETIC = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                        num_kv_heads=4, head_dim=64)
LORA = LoraSpec(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))


def measure(model_dir: str, base_quant: str, compute: str, seq: int, batch: int, steps: int) -> dict:
    runtime = Runtime(compute_dtype=jnp.dtype(compute), param_dtype=jnp.bfloat16, base_quant=base_quant)
    model, frozen = hf.load_pretrained(model_dir, runtime, LORA)
    lora = init_lora_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (batch, seq)), jnp.int32)
    batch_d = {"input_ids": ids, "targets": jnp.roll(ids, -1, axis=1), "loss_mask": jnp.ones((batch, seq), jnp.float32),
               "segment_ids": jnp.ones((batch, seq), jnp.int32),
               "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}
    train = jax.jit(jax.value_and_grad(lambda t, f, b: loss_sum(model, t, f, b, None, loss_chunk=128)))
    score = jax.jit(lambda t, f, i: model.apply({"params": merge_params(t, f)}, i, return_hidden=True))
    t_train = best_seconds(train, (lora, frozen, batch_d), steps)
    t_score = best_seconds(score, (lora, frozen, ids), steps)
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    return {"train_tokens_per_s": round(batch * seq / t_train, 1), "score_tokens_per_s": round(batch * seq / t_score, 1),
            "frozen_bytes": frozen_bytes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF dir (default: a synthetic model, see above)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compute", choices=("float32", "bfloat16"), default="float32")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qlora_bench_") as tmp:
        model_dir = a.model or str(tiny.write_tiny_model(tmp, SYNTHETIC, seed=0))
        bases = {q: measure(model_dir, q, a.compute, a.seq, a.batch, a.steps) for q in ("none", "nf4", "int8")}
    ref = bases["none"]
    result = {"benchmark": "qlora", "model": a.model or "synthetic (4 layers, d 512)", "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "compute_dtype": a.compute, "seq": a.seq, "batch": a.batch,
              "bf16": ref, "nf4": bases["nf4"], "int8": bases["int8"],
              "nf4_train_ratio": round(bases["nf4"]["train_tokens_per_s"] / ref["train_tokens_per_s"], 3),
              "nf4_score_ratio": round(bases["nf4"]["score_tokens_per_s"] / ref["score_tokens_per_s"], 3),
              "int8_train_ratio": round(bases["int8"]["train_tokens_per_s"] / ref["train_tokens_per_s"], 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
