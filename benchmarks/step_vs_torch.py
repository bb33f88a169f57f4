"""Our jitted LoRA train step against transformers + peft + torch.optim, measured in the same run.

    python -m benchmarks.step_vs_torch [--steps 3 --repeats 5] [--layers 4 --hidden 512 --heads 8
                                        --intermediate 1376 --vocab 32000 --seq 512 --batch 4]

The same LLaMA shape, batch and sequence; LoRA r=8 alpha=16 on q_proj, v_proj (dropout 0.05 on
both sides); AdamW with gradient clipping at 1.0; fp32 on CPU, bf16 on GPU. Every one of the
batch x seq tokens is trained on both sides (torch gets `shift_labels`, so HF does not drop the
last position of each row). Both are built and warmed up (2 steps each) in the same process, then
timed in `--repeats` interleaved rounds of `--steps` steps (the order alternates every round, so a
neighbour's load hits both alike). Prints one JSON line: the median tokens/s of each, the median of
the per-round ratios (ours / torch) and every round's ratio. Torch runs with its defaults (all
cores); so does XLA. Target on CPU: >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np


def _shape(a) -> dict:
    return dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_layers=a.layers,
                num_heads=a.heads, num_kv_heads=a.heads, head_dim=a.hidden // a.heads)


def setup_jax(a, ids: np.ndarray) -> tuple[Callable[[int], float], str]:
    """(run(n) -> seconds for n train steps, device kind), compiled and warmed up."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import all_trained_batch, random_lora_step
    from flacuna_jax.config import OptimConfig
    from flacuna_jax.model import Llama, LlamaConfig, LoraSpec, Runtime

    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    runtime = Runtime(compute_dtype=dtype, param_dtype=dtype, remat=a.remat,
                      attention="dot_product" if gpu else "xla")
    model = Llama(LlamaConfig(**_shape(a)), runtime, LoraSpec(8, 16.0, 0.05, ("q_proj", "v_proj")))
    step, state, frozen, mesh = random_lora_step(
        model, OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), loss_chunk=a.loss_chunk)
    batch = all_trained_batch(ids, mesh)
    box = [state]

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            box[0], m = step(box[0], frozen, batch)
        if not np.isfinite(float(m["loss"])):  # also waits for the last step
            raise RuntimeError("jax step produced a non-finite loss")
        return time.perf_counter() - t0

    run(2)  # compile + warm up
    return run, jax.devices()[0].device_kind


def setup_torch(a, ids: np.ndarray) -> Callable[[int], float]:
    """run(n) -> seconds for n transformers + peft + torch.optim train steps, warmed up."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    s = _shape(a)
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"])
    torch.manual_seed(0)
    if cuda:  # built on the GPU in bf16 (a large model initialised on the host in fp32 takes minutes)
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    else:
        model = LlamaForCausalLM(config)
    if a.remat != "none":  # the same memory trade on both sides
        model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5.x name
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    x = torch.as_tensor(ids, dtype=torch.long, device="cuda" if cuda else "cpu")
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        # shift_labels: HF would otherwise shift `labels` itself and train 1 token fewer per row
        out = model(input_ids=inputs, labels=inputs, shift_labels=targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        if not np.isfinite(loss.item()):  # also waits for the last step
            raise RuntimeError("torch step produced a non-finite loss")
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
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
    run_jax, device = setup_jax(a, ids)
    run_torch = setup_torch(a, ids)
    tokens = a.steps * a.batch * a.seq
    ours, theirs = [], []
    for r in range(a.repeats):  # alternate who goes first
        for side in ((run_jax, ours), (run_torch, theirs))[:: 1 if r % 2 == 0 else -1]:
            side[1].append(tokens / side[0](a.steps))
    ratios = [o / t for o, t in zip(ours, theirs)]
    result = {"benchmark": "step_vs_torch", "device": device, "shape": vars(a),
              "jax_tokens_per_s": round(statistics.median(ours), 1),
              "torch_peft_tokens_per_s": round(statistics.median(theirs), 1),
              "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
