"""Packing against padding: trained tokens/s of our input pipeline + jitted LoRA step, both in one run.

    python -m benchmarks.packing [--seq-len 1280] [--rows 8] [--steps 4] [--real | --demo]

The same tiny LLaMA (the demo preset, its vocabulary matched to the tokenizer), the same rows x
seq_len per step, the same configs/demo.yaml LoRA step on one device; only `data.packing` differs:
several examples per row (ours) or one example per row padded to seq_len (what the original
Flacuna/FastChat training did, with the paper's seq_len 1280). The data goes through the project's
own pipeline (`train_data.DataFeed`: template, loss mask, pack or pad, batch). Data: the real LLaMA
tokenizer and Vicuna-format conversations from ../shared/assets when present (read in place, never
copied into the project; --real requires them), else (or with --demo) the embedded FLAN-Mini-style
sample and its tokenizer (`flacuna_jax.demo_assets`), written to a temporary directory.

Per mode, after --warmup steps (compile included): wall time of --steps steps, each reading its
batch from the pipeline and running the step (the trained-token count read back every step). Reports
trained (loss-mask) tokens/s, trained tokens / slots (rows x seq_len) and real (non-padding) tokens
/ slots, and the ratio packed / padded of trained tokens/s. Target: ratio >= 3. One JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, SHARED_ASSETS, emit

TARGET_RATIO = 3.0


def prepare_data(tmp: str, which: str) -> tuple[str, str, str]:
    """(data source, tokenizer dir, description) for `which` in auto | real | demo."""
    from flacuna_jax import demo_assets

    model, convs = SHARED_ASSETS / "llama_tokenizer.model", SHARED_ASSETS / "fastchat_dummy_conversation.json"
    have_real = model.is_file() and convs.is_file()
    if which == "real" and not have_real:
        raise SystemExit(f"--real: {model} and {convs} are not both there")
    if which != "demo" and have_real:
        tok = Path(tmp) / "llama_tokenizer"  # a temp tokenizer dir: the model file + a config naming LlamaTokenizer
        tok.mkdir()
        shutil.copy(model, tok / "tokenizer.model")
        (tok / "tokenizer_config.json").write_text(json.dumps(demo_assets.TOKENIZER_CONFIG))
        return str(convs), str(tok), "LLaMA tokenizer + FastChat Vicuna-format conversations (../shared/assets)"
    paths = demo_assets.write_demo_assets(os.path.join(tmp, "demo"))
    return paths["sample"], paths["tokenizer"], "embedded demo sample + demo tokenizer"


def mode_config(model_dir: str, tokenizer: str, data: str, tmp: str, packing: bool, seq_len: int, rows: int,
                steps: int):
    """configs/demo.yaml on `data`, `rows` x `seq_len` per step: the two modes differ in data.packing only."""
    from flacuna_jax.config import load_config

    return load_config(ROOT / "configs/demo.yaml", [
        f"model.path={model_dir}", f"tokenizer.path={tokenizer}", f"data.sources=[{data}]",
        f"data.packing={str(packing).lower()}", "data.eval_fraction=0", f"data.cache_dir={tmp}/cache",
        f"train.seq_len={seq_len}", f"train.global_batch_size={rows}", f"train.per_device_batch_size={rows}",
        f"train.steps={steps}", f"output_dir={tmp}/run"])


def measure(cfg, steps: int, warmup: int) -> dict:
    """Trained tokens/s of `cfg`'s pipeline + train step on one device, end to end."""
    import jax

    from flacuna_jax.optim import make_optimizer
    from flacuna_jax.sharding import make_mesh
    from flacuna_jax.train import build_model
    from flacuna_jax.train_compile import batch_layout, configured_train_step
    from flacuna_jax.train_data import DataFeed
    from flacuna_jax.train_state import init_train_state, state_shardings

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    accum = batch_layout(cfg, mesh)
    model, frozen, trainable, p_shapes, p_shard = build_model(cfg, mesh)
    feed = DataFeed(cfg, mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    s_shard = state_shardings(mesh, tx, p_shapes, p_shard)
    state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=s_shard, donate_argnums=(0,))(trainable)
    step = configured_train_step(cfg, model, tx, schedule, mesh, s_shard, jax.tree.map(lambda x: x.sharding, frozen),
                                 accum)
    for _ in range(warmup):
        state, m = step(state, frozen, feed.next_batch())
        jax.block_until_ready(m)
    trained = real = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = feed.next_batch()
        state, m = step(state, frozen, batch)
        trained += int(m["tokens"])  # waits for the step
        real += int((batch["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    slots = steps * cfg.train.global_batch_size * cfg.train.seq_len
    return {"trained_tokens_per_s": round(trained / dt, 1), "trained_per_slot": round(trained / slots, 4),
            "real_per_slot": round(real / slots, 4), "step_time_s": round(dt / steps, 4), "trained_tokens": trained}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1280, help="tokens per row (the paper's 1280)")
    p.add_argument("--rows", type=int, default=8, help="rows per step (both modes)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (compile included)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--real", action="store_const", dest="data", const="real",
                       help="require ../shared/assets (default: use them when present)")
    which.add_argument("--demo", action="store_const", dest="data", const="demo", help="the embedded sample")
    a = p.parse_args(argv)

    from flacuna_jax.tiny import PRESETS, write_tiny_model
    from flacuna_jax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="packing_bench_") as tmp:
        data, tok, what = prepare_data(tmp, a.data or "auto")
        shape = dataclasses.replace(PRESETS["demo"], vocab_size=len(load_tokenizer(tok)),
                                    max_position_embeddings=max(a.seq_len, PRESETS["demo"].max_position_embeddings))
        model_dir = write_tiny_model(Path(tmp) / "model", shape)
        result = {"benchmark": "packing", "data": what, "seq_len": a.seq_len, "rows": a.rows, "steps": a.steps,
                  "model": f"demo preset, vocab {shape.vocab_size}"}
        for mode, packing in (("packed", True), ("padded", False)):
            cfg = mode_config(str(model_dir), tok, data, tmp, packing, a.seq_len, a.rows, a.steps + a.warmup)
            result[mode] = measure(cfg, a.steps, a.warmup)
    ratio = result["packed"]["trained_tokens_per_s"] / result["padded"]["trained_tokens_per_s"]
    result.update(ratio=round(ratio, 2), target_ratio=TARGET_RATIO, meets_target=ratio >= TARGET_RATIO,
                  cpus=os.cpu_count())
    return emit(result)


if __name__ == "__main__":
    main()
