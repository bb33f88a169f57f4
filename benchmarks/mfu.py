"""MFU of our LoRA train step on a LLaMA-7B shape (random weights), and transformers+peft on the same GPU.

    python -m benchmarks.mfu [--batch 4] [--steps 5] [--repeats 3] [--peak-tflops 989]
    python -m benchmarks.mfu --layers 2 --hidden 256 --heads 4 --intermediate 688 --vocab 1024 \\
        --seq 256 --batch 2            # a small shape: runs anywhere (CPU: fp32, minutes -> seconds)

The recipe is configs/vicuna_7b_lora.yaml (LoRA r=8 alpha=16 dropout 0.05 on q_proj, v_proj; remat,
attention, loss chunk, AdamW + clipping; 4 x 1280 tokens per device); the shape is tiny.PRESETS
["llama_7b"] unless --layers/--hidden/... override it. On GPU both sides run in bf16; ours with the
config's remat and attention ("dot_product": cuDNN flash attention), the state donated, weights
drawn on the device by a jitted init with out_shardings (7B is never on the host); torch with sdpa
attention, and gradient checkpointing (its only remat) when ours is remat=full, otherwise without
unless that runs out of memory (its fastest setting that fits; --torch-checkpointing overrides).
On CPU both run fp32 (XLA:CPU has no fast bf16) with XLA attention. Each side runs in its own
process, one after the other (JAX preallocates most of the GPU), is warmed up (--warmup steps,
compile included), then timed in --repeats rounds of --steps steps ending in block_until_ready /
cuda.synchronize; medians reported. Every one of batch x seq tokens is trained on both sides.

MFU = metrics.flops_per_token(shape, seq, "lora") x tokens/s / peak (model FLOPs: 2N forward + 2N
activation gradients + attention in full; the remat recompute is not counted). Peak: --peak-tflops,
else the chip's spec-sheet dense peak, metrics.peak_flops (H100/H200 SXM bf16: 989 TFLOP/s); on a device
without a known peak (CPU) "mfu" is null and "matmul_utilisation" divides by a dense matmul measured
here instead (`peak_source` says which; never called MFU). Targets on one H100: MFU >= 55% and >= 1.5x torch+peft tokens/s. Without
a GPU and without a shape override it prints {"benchmark": "mfu", "skipped": REASON}. One JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from benchmarks.common import ROOT, BenchError, all_trained_batch, child_env, emit, random_lora_step, run_json

SHAPE_ARGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
              "intermediate": "intermediate_size", "vocab": "vocab_size"}


def recipe(a):
    """(training config, LlamaConfig, whether the shape is the 7B one) from the arguments."""
    from flacuna_jax.config import load_config
    from flacuna_jax.tiny import PRESETS

    cfg = load_config(a.config, [f"train.seq_len={a.seq}"] * bool(a.seq) + [f"model.remat={a.remat}"] * bool(a.remat))
    changes = {field: getattr(a, arg) for arg, field in SHAPE_ARGS.items() if getattr(a, arg) is not None}
    if "num_heads" in changes:  # head_dim follows hidden / heads; kv heads default to heads (MHA, as 7B)
        changes.setdefault("num_kv_heads", changes["num_heads"])
    shape = dataclasses.replace(PRESETS["llama_7b"], **changes)
    shape = dataclasses.replace(shape, head_dim=shape.hidden_size // shape.num_heads,
                                max_position_embeddings=max(shape.max_position_embeddings, cfg.train.seq_len))
    return cfg, shape, not changes


def timed_rounds(run, a, tokens_per_step: int) -> dict:
    """run(n) -> seconds for n steps; warm-up (at least the compiling step), then medians over rounds."""
    run(max(a.warmup, 1))
    secs = [run(a.steps) for _ in range(a.repeats)]
    per_s = [a.steps * tokens_per_step / s for s in secs]
    return {"tokens_per_s": round(statistics.median(per_s), 1),
            "step_time_s": round(statistics.median(secs) / a.steps, 4),
            "rounds_tokens_per_s": [round(x, 1) for x in per_s]}


def measured_peak_tflops(dtype) -> float:
    """Best dense matmul rate of this device in `dtype` (n^3, n = 8192 on GPU, 2048 elsewhere)."""
    import jax

    n = 8192 if jax.default_backend() == "gpu" else 2048
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(x))
    best = min(_time(lambda: jax.block_until_ready(mm(x))) for _ in range(5))
    return 2 * n**3 / best / 1e12


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def jax_side(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flacuna_jax.metrics import flops_per_token, peak_flops
    from flacuna_jax.model import Llama, LoraSpec, Runtime

    cfg, shape, seven_b = recipe(a)
    backend = jax.default_backend()
    if seven_b and backend != "gpu":
        return {"skipped": f"no GPU (JAX backend {backend}): the 7B shape needs one; pass --layers/--hidden/... "
                           "for a small shape"}
    gpu = backend == "gpu"
    dtype = jnp.dtype(cfg.model.compute_dtype) if gpu else jnp.dtype(jnp.float32)
    runtime = Runtime(dtype, dtype, cfg.model.remat, cfg.model.attention if gpu else "xla")
    lora = LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets))
    model = Llama(shape, runtime, lora)
    step, state, frozen, mesh = random_lora_step(model, cfg.optim, seed=cfg.seed, loss_chunk=cfg.train.loss_chunk,
                                                 dropout=cfg.lora.dropout > 0)
    b, t = a.batch or cfg.train.per_device_batch_size, cfg.train.seq_len
    batch = all_trained_batch(np.random.default_rng(0).integers(0, shape.vocab_size, (b, t + 1)).astype(np.int32), mesh)
    box = {"state": state}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            box["state"], m = step(box["state"], frozen, batch)
        jax.block_until_ready((box["state"], m))
        dt = time.perf_counter() - t0
        if not np.isfinite(float(m["loss"])):
            raise RuntimeError("our step produced a non-finite loss")
        return dt

    timing = timed_rounds(run, a, b * t)
    device = jax.devices()[0]
    if a.peak_tflops:
        peak, source = a.peak_tflops, "--peak-tflops"
    elif (known := peak_flops(device.device_kind, dtype.name)) is not None:
        peak, source = known / 1e12, f"metrics.peak_flops({device.device_kind!r}, {dtype.name})"
    else:
        peak, source = round(measured_peak_tflops(dtype), 3), f"measured {dtype.name} matmul on this device (not a spec peak)"
    stats = device.memory_stats() or {}
    return {"backend": backend, "device": device.device_kind, "dtype": dtype.name, "remat": runtime.remat,
            "attention": runtime.attention, "seven_b": seven_b,
            "shape": {arg: getattr(shape, field) for arg, field in SHAPE_ARGS.items()}, "batch": b, "seq_len": t,
            "loss_chunk": cfg.train.loss_chunk,
            "flops_per_token": flops_per_token(shape, t, "lora"), "peak_tflops": peak, "peak_source": source,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), **timing}


def torch_side(a) -> dict:
    import gc

    import torch

    cfg, shape, seven_b = recipe(a)
    cuda = torch.cuda.is_available()
    if seven_b and not cuda:
        return {"skipped": "no CUDA device for torch: the 7B shape needs one"}
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, t = a.batch or cfg.train.per_device_batch_size, cfg.train.seq_len
    # auto: torch's fastest setting that fits. Checkpointing (torch's only remat) when ours recomputes
    # everything too; otherwise none, falling back to checkpointing if that runs out of memory.
    checkpointing = a.torch_checkpointing == "on" or (a.torch_checkpointing == "auto" and cfg.model.remat == "full")
    oom = False
    while True:
        try:
            run, attention = _torch_step(cfg, shape, b, t, device, dtype, checkpointing)
            timing = timed_rounds(run, a, b * t)
            break
        except torch.cuda.OutOfMemoryError:
            if a.torch_checkpointing != "auto" or checkpointing:
                raise
        run = None  # outside the except block, so the failed attempt's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        checkpointing = oom = True
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
            "attention": attention, "gradient_checkpointing": checkpointing, "out_of_memory_without": oom,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None, **timing}


def _torch_step(cfg, shape, b: int, t: int, device: str, dtype, checkpointing: bool):
    """(run(n) -> seconds for n transformers + peft + torch.optim steps, attention implementation)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                         head_dim=shape.head_dim, max_position_embeddings=shape.max_position_embeddings,
                         rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs, in its dtype (7B fp32 on the host takes minutes)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if checkpointing:  # transformers 5.x name; gradient_checkpointing_enable is its deprecated alias
        model.activation_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=list(cfg.lora.targets), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, shape.vocab_size, (b, t + 1)), device=device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            # shift_labels: HF would otherwise shift `labels` itself and train one token fewer per row
            loss = model(input_ids=inputs, labels=inputs, shift_labels=targets).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if not np.isfinite(loss.item()):
            raise RuntimeError("torch step produced a non-finite loss")
        return dt

    return run, model.config._attn_implementation


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/vicuna_7b_lora.yaml"), help="the recipe (LoRA, remat, ...)")
    for arg in SHAPE_ARGS:
        p.add_argument(f"--{arg.replace('_', '-')}", dest=arg, type=int, help="shape override (default: LLaMA-7B)")
    p.add_argument("--seq", type=int, help="tokens per row (default: the config's train.seq_len, 1280)")
    p.add_argument("--batch", type=int, help="rows per step (default: the config's per_device_batch_size)")
    p.add_argument("--remat", choices=["none", "full", "dots_saveable"], help="default: the config's")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile included)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians reported)")
    p.add_argument("--peak-tflops", type=float, help="the MFU denominator (default: metrics.peak_flops, the spec "
                   "sheet's dense peak, e.g. 989 on an H100/H200 SXM in bf16; else no MFU, a measured matmul instead)")
    p.add_argument("--side", choices=["both", "jax", "torch"], default="both",
                   help="both: each side in its own process (the default); jax/torch: this process runs one")
    p.add_argument("--no-torch", action="store_true", help="measure our side only")
    p.add_argument("--torch-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="torch's gradient checkpointing; auto: on when our remat is full, else off unless "
                        "that runs out of GPU memory")
    a = p.parse_args(argv)
    if a.side != "both":
        return emit((jax_side if a.side == "jax" else torch_side)(a))

    args = ["-m", "benchmarks.mfu", *(argv if argv is not None else sys.argv[1:])]
    ours = run_json([*args, "--side", "jax"])
    if "skipped" in ours:
        return emit({"benchmark": "mfu", "skipped": ours["skipped"]})
    result = {"benchmark": "mfu", **ours}
    per_token, peak = ours["flops_per_token"], ours["peak_tflops"] * 1e12
    spec = not ours["peak_source"].startswith("measured")
    key = "mfu" if spec else "matmul_utilisation"
    result["mfu"] = None
    result[key] = round(per_token * ours["tokens_per_s"] / peak, 4)
    try:
        torch = {"skipped": "--no-torch"} if a.no_torch else run_json([*args, "--side", "torch"], env=child_env())
    except BenchError as e:  # ours is still a result
        torch = {"error": str(e)}
    result["torch_peft"] = torch
    if "tokens_per_s" in torch:
        result[f"torch_peft_{key}"] = round(per_token * torch["tokens_per_s"] / peak, 4)
        result["ratio"] = round(ours["tokens_per_s"] / torch["tokens_per_s"], 3)
    return emit(result)


if __name__ == "__main__":
    main()
