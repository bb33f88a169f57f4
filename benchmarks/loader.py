"""Input-pipeline throughput per host: tokens/s through template + mask + pack + batch.

    python benchmarks/loader.py [--seq-len 2048] [--batch-size 8] [--num-workers 0] [--hosts 1]

Uses the real LLaMA tokenizer and Vicuna conversations from ../shared/assets when present
(copied to a temp dir; never into the project), else the generated demo sample and tokenizer.
Prints one JSON line; ``tokens_per_s`` counts the real (non-padding) tokens of the rows this host
builds. ``--hosts N`` measures host 0 of N: it plans every row of the global batch (``--batch-size``)
and builds its own B/N rows (data/batches.py). ``table_s`` is the one-time example-table pass
(lengths of every record; with N hosts each does 1/N of it). Target: >= 100K on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from flacuna_jax import demo_assets
from flacuna_jax.data import make_pipeline

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")


def prepare(tmp: str) -> tuple[str, str, str]:
    model = os.path.join(ASSETS, "llama_tokenizer.model")
    convs = os.path.join(ASSETS, "fastchat_dummy_conversation.json")
    if os.path.isfile(model) and os.path.isfile(convs):
        tok = os.path.join(tmp, "llama_tokenizer")
        os.makedirs(tok)
        shutil.copy(model, os.path.join(tok, "tokenizer.model"))
        with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
            json.dump(demo_assets.TOKENIZER_CONFIG, f)
        return convs, tok, "llama tokenizer + fastchat dummy conversations"
    paths = demo_assets.write_demo_assets(os.path.join(tmp, "demo"))
    return paths["sample"], paths["tokenizer"], "demo tokenizer + demo sample"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--packing", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--hosts", type=int, default=1, help="measure host 0 of this many (its share of the rows)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, tok, what = prepare(tmp)
        pipe = make_pipeline(data, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                             epochs=None, packing=bool(args.packing),
                             num_workers=args.num_workers, cache_dir=os.path.join(tmp, "cache"))
        t0 = time.perf_counter()
        pipe.table  # the one-time pass over every record (its length), before the first batch
        table_s = time.perf_counter() - t0
        it = pipe.iterator(rows=range(args.batch_size // args.hosts))  # host 0's contiguous block of rows
        next(it)  # warm-up: first epoch order
        tokens = batches = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            b = next(it)
            tokens += int((b["segment_ids"] > 0).sum())
            batches += 1
        dt = time.perf_counter() - t0
        if hasattr(it, "close"):
            it.close()
    print(json.dumps({"benchmark": "loader", "data": what, "seq_len": args.seq_len,
                      "batch_size": args.batch_size, "num_workers": args.num_workers,
                      "packing": bool(args.packing), "hosts": args.hosts, "batches": batches,
                      "table_s": round(table_s, 2),
                      "tokens_per_s": round(tokens / dt), "batches_per_s": round(batches / dt, 2),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
