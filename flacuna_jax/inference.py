"""The model the inference tools run, and the arguments that choose it (generate, score and eval share them).

A base Hugging Face LLaMA dir, optionally with a PEFT adapter or a training run's latest trainable
parameters: LoRA factors are folded into the base (W + alpha/r A B, computed in fp32), so decoding and
scoring run plain matmuls; a full fine-tune's weights replace the base's.

`--base-quant nf4|int8` quantizes the base's decoder projections while loading, as bitsandbytes does
(`quant.py`). LoRA factors then stay beside the quantized kernels and are applied on top of them in
each matmul, as PEFT does on a bitsandbytes base (a quantized weight cannot hold the fold exactly).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from flacuna_jax.attention import DECODE_KERNELS, KERNELS
from flacuna_jax.config import BASE_QUANTS
from flacuna_jax.dtypes import FLOAT_DTYPES
from flacuna_jax.matmul_cpu import KERNELS as MATMUL_KERNELS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --adapter | --run, --dtype, --base-quant, --attention, --decode-attention, --matmul."""
    p.add_argument("--model", required=True, help="local Hugging Face LLaMA-family directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT LoRA adapter directory, folded into --model (kept beside a --base-quant base)")
    src.add_argument("--run", help="training run directory: its latest checkpoint, folded into --model (kept beside a --base-quant base)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32", help="compute and parameter dtype")
    p.add_argument("--base-quant", choices=BASE_QUANTS, default="none",
                   help="quantize the base's decoder projections as bitsandbytes does (LoRA applied on top, unfolded)")
    p.add_argument("--attention", choices=KERNELS, default="xla",
                   help="attention kernel, as model.attention in training: xla (the reference), dot_product (cuDNN), "
                        "splash (TPU; one decoded token uses xla), auto (splash on a TPU, cuDNN on a GPU, else XLA's)")
    add_cpu_kernel_args(p)


def add_cpu_kernel_args(p: argparse.ArgumentParser) -> None:
    """--decode-attention (`Runtime.decode_attention`) and --matmul (`model.unrolled`), shared by the
    inference CLIs and the server."""
    p.add_argument("--decode-attention", choices=DECODE_KERNELS, default="native",
                   help="a decoded token's attention over the KV cache: native (a fused C++ kernel for the CPU in "
                        "float32, built on first use; elsewhere XLA's) or xla")
    p.add_argument("--matmul", choices=MATMUL_KERNELS, default="native",
                   help="the decoder's projections and the output projection: native (weights packed for a C++ kernel "
                        "for the CPU in float32, built on first use, the output projection's as a second copy and a half-"
                        "precision one that settles greedy steps exactly; elsewhere, or on a quantized base, XLA's) or xla")


def load_from_args(a: argparse.Namespace) -> tuple[Any, Any]:
    """(model, params) chosen by the `add_model_args` arguments, laid out for decoding (`layers`)."""
    return load_for_inference(a.model, a.adapter, a.run, FLOAT_DTYPES[a.dtype], a.base_quant, a.attention,
                              layers="unrolled", decode_attention=a.decode_attention, matmul=a.matmul)


def load_for_inference(model_dir: str, adapter: str | None = None, run: str | None = None,
                       dtype: Any = jnp.float32, base_quant: str = "none", attention: str = "xla",
                       layers: str = "scan", decode_attention: str = "native", matmul: str = "native") -> tuple[Any, Any]:
    """(model, params) of the base model with an adapter or a training run's LoRA folded in (or, on a
    quantized base, beside it). `layers="unrolled"`: one weight buffer per layer, what decoding and
    scoring run fastest on (`model.unrolled`; a quantized base stays scanned); "scan": the stacked
    layout training uses (`params["layers"]`). `matmul`: `model.unrolled`'s (unrolled layers only)."""
    if layers not in ("scan", "unrolled"):
        raise ValueError(f"layers must be scan or unrolled, got {layers!r}")
    model, params = _load(model_dir, adapter, run, dtype, base_quant, attention, decode_attention)
    if layers == "unrolled":
        from flacuna_jax.model import unrolled

        return unrolled(model, params, matmul)
    return model, params


def _load(model_dir: str, adapter: str | None, run: str | None, dtype: Any, base_quant: str,
          attention: str, decode_attention: str) -> tuple[Any, Any]:
    from flacuna_jax.hf import load_pretrained
    from flacuna_jax.lora import fold_lora, merge_params
    from flacuna_jax.model import LoraSpec, Runtime

    runtime = Runtime(compute_dtype=dtype, param_dtype=dtype, attention=attention, base_quant=base_quant,
                      decode_attention=decode_attention)
    model, params = load_pretrained(model_dir, runtime)
    if adapter is None and run is None:
        return model, params
    if adapter is not None:
        from flacuna_jax.peft_io import load_adapter

        lora_spec, trainable = load_adapter(adapter, model.config)
    else:
        from flacuna_jax.checkpoint import load_trainable

        _, trainable, cfg = load_trainable(run)
        if cfg.finetune == "full":
            if base_quant != "none":
                raise ValueError(f"--run {run}: a full fine-tune's weights replace the base; --base-quant does not apply")
            return model, jax.tree.map(lambda x: jnp.asarray(x, dtype), trainable)
        lora_spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, 0.0, tuple(cfg.lora.targets))
    if base_quant != "none":  # the factors (fp32) on top of the quantized kernels, applied in each matmul
        return model.clone(lora=lora_spec), merge_params(trainable, params)
    folded = fold_lora(merge_params(trainable, params), lora_spec)
    return model, jax.tree.map(lambda x: jnp.asarray(x, dtype), folded)
