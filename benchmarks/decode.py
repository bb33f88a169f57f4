"""Decode tokens/s of `generate.Generator` against transformers' `generate`, same prompts, same weights.

    python -m benchmarks.decode [--model HF_DIR | --tiny] [--batch-sizes 1 16] [--prompt-len 32]
        [--new-tokens 64] [--repeats 3] [--layers unrolled|scan]

Prints one JSON line. Default model: SmolLM2-135M-Instruct (benchmarks/smollm2.py), fp32, CPU; --tiny:
the demo preset (random weights, 2 layers). Per batch size, both sides decode the same random
prompts of --prompt-len ids greedily with EOS disabled, so each produces exactly --new-tokens tokens:
ours through the compiled decoder (`Generator.decoder`, the params laid out as `--layers`: unrolled is
what the inference CLIs load, scan the training layout), theirs through
`LlamaForCausalLM.generate(do_sample=False)` with torch's default threads (--torch-threads 1: one
thread, a per-core comparison that a busy machine distorts less). Each side is timed
generating --new-tokens and generating 1 (prefill + one step), interleaved, best of --repeats rounds
after a warm-up (a round of a fast call repeats it for >= 0.2 s); decode tokens/s = batch *
(new_tokens - 1) / (difference): the token loop alone.
`ratio` = ours / transformers; `same_rows`: rows whose tokens are identical on both sides.
The load average before and after is recorded; above the core count the line says `"loaded": true`
(common.Load).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Load, emit


def best_of(fns: dict, repeats: int, min_seconds: float = 0.2) -> dict[str, float]:
    """Each callable's fastest time per call over `repeats` rounds, interleaved (every callable warmed up
    first); a round calls a fast callable several times, so that it lasts >= min_seconds."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: min(t) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--tiny", action="store_true", help="instead: the demo preset (random weights, 2 layers)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", choices=["unrolled", "scan"], default="unrolled")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    from transformers import AutoModelForCausalLM

    from flacuna_jax import tiny
    from flacuna_jax.generate import Generator, left_pad
    from flacuna_jax.inference import load_for_inference

    with tempfile.TemporaryDirectory(prefix="decode_bench_") as tmp:  # weights are read into memory
        if a.model:
            model_dir = a.model
        elif a.tiny:
            model_dir = tiny.write_tiny_model(tmp, tiny.PRESETS["demo"], seed=0)
        else:
            from benchmarks.smollm2 import smollm2_dir

            model_dir = str(smollm2_dir())
        model, params = load_for_inference(str(model_dir), layers=a.layers)
        ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # every row generates all --new-tokens, as ours with eos_ids=()
    rng = np.random.default_rng(0)
    result = {"benchmark": "decode", "model": "demo preset (random)" if a.tiny and not a.model else str(model_dir),
              "layers": a.layers, "dtype": "float32", "backend": jax.default_backend(),
              "torch_threads": torch.get_num_threads(), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    with Load() as load:
        for b in a.batch_sizes:
            gen = Generator(model, params, eos_ids=(), batch_size=b)
            prompts = [rng.integers(3, model.config.vocab_size, a.prompt_len).tolist() for _ in range(b)]
            ids, seg = left_pad(prompts, a.prompt_len, b)
            ours_args = (params, jnp.asarray(ids), jnp.asarray(seg), jax.random.key(0), jnp.float32(0), jnp.float32(1))
            ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(seg, dtype=torch.long)

            def theirs(n):
                with torch.no_grad():
                    return ref.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=n, do_sample=False,
                                        pad_token_id=0)[:, a.prompt_len:].numpy()

            decoders = {n: gen.decoder(n) for n in (1, a.new_tokens)}
            times = best_of({f"ours_{n}": (lambda n=n: jax.block_until_ready(decoders[n](*ours_args))) for n in decoders}
                            | {f"theirs_{n}": (lambda n=n: theirs(n)) for n in decoders}, a.repeats)
            same = np.asarray(decoders[a.new_tokens](*ours_args)["tokens"]) == theirs(a.new_tokens)
            loop_s = {side: times[f"{side}_{a.new_tokens}"] - times[f"{side}_1"] for side in ("ours", "theirs")}
            if min(loop_s.values()) <= 0:
                raise SystemExit(f"batch {b}: generating {a.new_tokens} tokens was not slower than generating 1 "
                                 f"({loop_s}); a busy machine? raise --new-tokens or --repeats")
            rate = {side: b * (a.new_tokens - 1) / s for side, s in loop_s.items()}
            result[f"batch{b}"] = {
                "ours_decode_tokens_per_s": round(rate["ours"], 1), "transformers_decode_tokens_per_s": round(rate["theirs"], 1),
                "ratio": round(rate["ours"] / rate["theirs"], 2),
                "ours_end_to_end_s": round(times[f"ours_{a.new_tokens}"], 4),
                "transformers_end_to_end_s": round(times[f"theirs_{a.new_tokens}"], 4),
                "same_rows": f"{int(same.all(axis=1).sum())}/{b}"}
    result.update(load.fields())
    result["meets_target"] = all(result[f"batch{b}"]["ratio"] >= 1.5 for b in a.batch_sizes)
    return emit(result)


if __name__ == "__main__":
    main()
