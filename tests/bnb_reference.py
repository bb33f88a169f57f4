"""Quantized references that compute the same on every CPU: transformers' fp32 LLaMA whose quantized
linears hold bitsandbytes' own dequantized weights.

Why not bitsandbytes' modules themselves: what `bnb.nn.Linear4bit` computes depends on the CPU.
bitsandbytes 0.50.2 decides it per module at construction (`support_avx512bf16_for_cpu =
has_avx512bf16()`, nn/modules.py). On a CPU with AVX512-BF16, a forward in eval mode whose input
needs no gradient repacks the weight and runs the fused `gemv_4bit` kernel registered in
backends/cpu/ops.py, which casts the activations and absmax to bfloat16: logits ~2e-2 and LoRA
gradients ~5% off an fp32 computation. On every other CPU (and for inputs that need a gradient) it
runs `gemm_4bit`'s default kernel (backends/default/ops.py): `dequantize_4bit`, then
`torch.nn.functional.linear` in the compute dtype (fp32 here). The references below are that second
computation, written with bitsandbytes' public API, so no tolerance depends on the machine.

The quantization itself stays bitsandbytes' own, as a user's QLoRA setup runs it: the model is
loaded through transformers with `BitsAndBytesConfig` (which modules are quantized, and how, are
theirs), then each quantized linear's weight is dequantized by bitsandbytes:
- NF4: `bitsandbytes.functional.dequantize_4bit`. Its CPU kernel picks an AVX512 or a scalar loop at
  run time; both compute `code[q] * absmax` (one fp32 product), bit-identical when a row holds whole
  blocks. The AVX512 loop indexes absmax per row, so for rows narrower than a block, or not a whole
  number of blocks, it disagrees with `quantize_4bit`'s flat blocks (measured on this machine: a 64 x
  32 weight, 1793 of 2048 entries differ). Such shapes are refused here rather than compared.
- int8: `int8_vectorwise_dequant(CB, SCB)` = CB * SCB / 127 (bitsandbytes' int8 matmul would also
  quantize the activations, which our weight-only int8 does not).
"""

from __future__ import annotations

import torch

NF4_BLOCKSIZE = 64  # BitsAndBytesConfig's default bnb_4bit_blocksize


def quantized_reference(model_dir, kind: str):
    """(fp32 LlamaForCausalLM holding the dequantized weights, number of linears replaced)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    if kind == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_blocksize=NF4_BLOCKSIZE)
    elif kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"kind must be nf4 or int8, not {kind!r}")
    quantized = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.float32,
                                                     device_map="cpu")
    ref = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    modules = dict(ref.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, mod in quantized.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                state = mod.weight.quant_state
                assert state.blocksize == NF4_BLOCKSIZE and mod.in_features % state.blocksize == 0, (
                    f"{name}: in_features {mod.in_features} is not a multiple of the block size {state.blocksize}: "
                    "bitsandbytes' CPU dequantization differs between CPUs there (see this module's docstring)")
                weight = F.dequantize_4bit(mod.weight.data, state)
            elif isinstance(mod, bnb.nn.Linear8bitLt):
                weight = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB)
            else:
                continue
            target = modules[name].weight
            assert weight.shape == target.shape and weight.dtype == torch.float32, (name, weight.shape, weight.dtype)
            target.copy_(weight)
            replaced += 1
    return ref, replaced
