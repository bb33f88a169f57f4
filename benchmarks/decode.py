"""Decode throughput of `generate.Generator` on the demo-preset model, batch 1 and 8.

    .venv/bin/python benchmarks/decode.py [--model HF_DIR] [--prompt-len 32] [--new-tokens 128] [--repeats 3]

Prints one JSON line. EOS is disabled so every run decodes exactly --new-tokens tokens. For each
batch size: the end-to-end time of one compiled call (prefill + loop), the time of a call that
generates 1 token (prefill + one step), and decode tokens/s = batch * (new_tokens - 1) / (difference),
i.e. the token loop alone. Times are the best of --repeats after a compile-and-warm-up call.
Without --model the demo preset (random weights, vocab 2048) is written to a temporary directory.
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
from flacuna_jax.generate import Generator, bucket_width, left_pad


def best_time(decode, params, ids, seg, repeats: int) -> float:
    args = (params, jnp.asarray(ids), jnp.asarray(seg), jax.random.key(0), jnp.float32(0), jnp.float32(1))
    return best_seconds(decode, args, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF dir (default: the demo preset with random weights)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as tmp:  # weights are read into memory
        model, params = hf.load_pretrained(a.model or tiny.write_tiny_model(tmp, tiny.PRESETS["demo"], seed=0))
    rng = np.random.default_rng(0)
    result = {"benchmark": "decode", "model": a.model or "demo preset (random)", "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    for b in a.batch_sizes:
        gen = Generator(model, params, eos_ids=(), batch_size=b)
        prompts = [[1] + rng.integers(3, model.config.vocab_size, a.prompt_len - 1).tolist() for _ in range(b)]
        ids, seg = left_pad(prompts, bucket_width(a.prompt_len), b)
        full = best_time(gen.decoder(a.new_tokens), params, ids, seg, a.repeats)
        one = best_time(gen.decoder(1), params, ids, seg, a.repeats)
        result[f"batch{b}"] = {"end_to_end_s": round(full, 4), "prefill_plus_1_s": round(one, 4),
                               "decode_tokens_per_s": round(b * (a.new_tokens - 1) / max(full - one, 1e-9), 1),
                               "end_to_end_tokens_per_s": round(b * a.new_tokens / full, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
