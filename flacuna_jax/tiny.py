"""Tiny random LLaMA models written as Hugging Face directories (for tests, the demo, benchmarks).

    python -m flacuna_jax.tiny --preset demo --vocab-size 2048 --out build/demo/model

Weights are drawn with numpy from a seed (normal, std 0.02; norms at 1), so the same command writes
the same bytes. No network, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from flacuna_jax.dtypes import FLOAT_DTYPES
from flacuna_jax.hf import hf_config_dict, weight_specs, write_hf_weights
from flacuna_jax.model import LlamaConfig, RopeScaling

PRESETS: dict[str, LlamaConfig] = {
    # The demo model: small enough to train for a few hundred steps on 2 CPU cores.
    "demo": LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5),
    "mha": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5),
    "gqa": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=8,
                       num_kv_heads=2, head_dim=8, rope_theta=500000.0),
    "llama3": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, rope_theta=500000.0, max_position_embeddings=256,
                          rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
    "linear_rope": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=4, head_dim=16, rope_scaling=RopeScaling("linear", 2.0)),
    "tied": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=1, head_dim=16, tie_word_embeddings=True),
    "odd": LlamaConfig(vocab_size=251, hidden_size=72, intermediate_size=200, num_layers=3, num_heads=6,
                       num_kv_heads=3, head_dim=12),
    # LLaMA-13B (Vicuna-13B v1.1) shape; never written, used for abstract shapes and planning.
    "llama_13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                             num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=2048),
    "llama_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                            num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=2048),
}


# A random model's final RMSNorm (weight ~1) caps |logits| near |W_lm| * sqrt(d) ~ 2.6 for the demo
# shape, so LoRA on the frozen random base cannot express a confident prediction and the demo's
# loss would plateau near 5.3; a 10x final norm makes the tiny base LoRA-trainable (loss 9.6 -> ~1).
FINAL_NORM_SCALE = {"demo": 10.0}


def random_hf_tensors(config: LlamaConfig, seed: int, dtype=np.float32, final_norm_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    for spec in weight_specs(config):
        n = config.num_layers if spec.stacked else 1
        for i in range(n):
            name = spec.hf_name.format(i=i)
            shape = _hf_shape(config, spec.path)
            if spec.path[-1] == "scale":
                # Norm weights near 1 (not exactly: parity tests must see them applied).
                t = 1.0 + 0.1 * rng.standard_normal(shape)
                if spec.path == ("norm", "scale"):
                    t = t * final_norm_scale
            else:
                t = 0.02 * rng.standard_normal(shape)
            yield name, t.astype(dtype)


def _hf_shape(c: LlamaConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "embed_tokens": (c.vocab_size, c.hidden_size), "input_norm": (c.hidden_size,),
        "post_attention_norm": (c.hidden_size,), "norm": (c.hidden_size,), "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size), "o_proj": (c.hidden_size, q),
        "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size), "lm_head": (c.vocab_size, c.hidden_size),
    }[path[-2] if path[0] == "layers" else path[0]]


def write_tiny_model(out_dir: str | Path, config: LlamaConfig, seed: int = 0, dtype=np.float32,
                     max_shard_size: str | int = "5GB", final_norm_scale: float = 1.0) -> Path:
    out = Path(out_dir)
    write_hf_weights(out, random_hf_tensors(config, seed, dtype, final_norm_scale), max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, np.dtype(dtype).name), indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size (match your tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--final-norm-scale", type=float,
                   help=f"multiply the final RMSNorm weight (default: {FINAL_NORM_SCALE} by preset, else 1)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    config = PRESETS[a.preset]
    if a.vocab_size:
        config = dataclasses.replace(config, vocab_size=a.vocab_size)
    dtype = FLOAT_DTYPES[a.dtype]
    scale = a.final_norm_scale if a.final_norm_scale is not None else FINAL_NORM_SCALE.get(a.preset, 1.0)
    write_tiny_model(a.out, config, a.seed, dtype, a.max_shard_size, scale)
    print(f"wrote {a.preset} model ({config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}) to {a.out}")


if __name__ == "__main__":
    main()
