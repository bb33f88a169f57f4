"""Our jitted LoRA train step against transformers + peft + torch.optim, measured in the same run.

    python -m benchmarks.step_vs_torch [--steps 5] [--layers 4 --hidden 512 --heads 8 --intermediate 1376
                                        --vocab 32000 --seq 512 --batch 4]

The same LLaMA shape, batch and sequence; LoRA r=8 alpha=16 on q_proj, v_proj (dropout 0.05);
AdamW; fp32 on CPU, bf16 on GPU. Every token is trained. Prints one JSON line with tokens/s of
each and the ratio (ours / torch). Target on CPU: >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _shape(a) -> dict:
    return dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_layers=a.layers,
                num_heads=a.heads, num_kv_heads=a.heads, head_dim=a.hidden // a.heads)


def bench_jax(a, ids: np.ndarray) -> tuple[float, str]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flacuna_jax.config import OptimConfig
    from flacuna_jax.lora import split_params
    from flacuna_jax.model import Llama, LlamaConfig, LoraSpec, Runtime, abstract_params
    from flacuna_jax.optim import make_optimizer
    from flacuna_jax.sharding import make_mesh, tree_shardings
    from flacuna_jax.step import make_train_step
    from flacuna_jax.train_state import init_train_state, state_shardings

    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    runtime = Runtime(compute_dtype=dtype, param_dtype=dtype, remat=a.remat,
                      attention="dot_product" if gpu else "xla")
    model = Llama(LlamaConfig(**_shape(a)), runtime, LoraSpec(8, 16.0, 0.05, ("q_proj", "v_proj")))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shapes, names = abstract_params(model)
    shardings = tree_shardings(mesh, names, shapes)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]),
                     out_shardings=shardings)(jax.random.key(0))
    trainable, frozen = split_params(params, "lora")
    trainable_sh, frozen_sh = split_params(shardings, "lora")
    tx, schedule = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 1000)
    st_sh = state_shardings(mesh, tx, jax.eval_shape(lambda: trainable), trainable_sh)
    state = jax.jit(lambda p: init_train_state(p, tx, 0), out_shardings=st_sh)(trainable)
    step = make_train_step(model, tx, schedule, mesh, st_sh, frozen_sh, accum=1, loss_chunk=a.loss_chunk)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones(ids[:, 1:].shape, np.float32),
             "segment_ids": np.ones(ids[:, 1:].shape, np.int32),
             "positions": np.broadcast_to(np.arange(ids.shape[1] - 1, dtype=np.int32), ids[:, 1:].shape)}
    for _ in range(2):  # compile + warm up
        state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    return a.steps * batch["loss_mask"].size / (time.perf_counter() - t0), jax.devices()[0].device_kind


def bench_torch(a, ids: np.ndarray) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    s = _shape(a)
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if cuda:
        model = model.to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    x = torch.as_tensor(ids, dtype=torch.long, device="cuda" if cuda else "cpu")

    def step():
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels internally
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    if cuda:
        torch.cuda.synchronize()
    return a.steps * x[:, :-1].numel() / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
    p.add_argument("--loss-chunk", type=int, default=0)
    a = p.parse_args(argv)
    ids = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq + 1)).astype(np.int32)
    ours, device = bench_jax(a, ids)
    theirs = bench_torch(a, ids)
    result = {"benchmark": "step_vs_torch", "device": device, "shape": vars(a),
              "jax_tokens_per_s": round(ours, 1), "torch_peft_tokens_per_s": round(theirs, 1),
              "ratio": round(ours / theirs, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
