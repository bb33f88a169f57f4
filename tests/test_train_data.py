"""train_data.DataFeed across processes: the in-training held-out evaluation scores every example
exactly once (two processes x two CPU devices, gloo collectives): both hosts plan the same global
eval batches and each builds the rows its devices hold."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

# Counts, over all hosts, the examples (segment starts) and trained tokens the eval batches hold, and
# the trained tokens of the whole eval split as this host's loader plans it (every row built).
WORKER = """
import json, sys
import jax, jax.numpy as jnp
from flacuna_jax import distributed
from flacuna_jax.config import load_config
from flacuna_jax.sharding import make_mesh
from flacuna_jax.train_data import DataFeed

distributed.initialize()
cfg = load_config("configs/demo.yaml", sys.argv[1:])
mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
feed = DataFeed(cfg, mesh)
count = jax.jit(lambda b: (jnp.sum((b["positions"] == 0) & (b["segment_ids"] > 0)), jnp.sum(b["loss_mask"])))
examples = tokens = steps = 0
for batch in feed.eval_batches():
    e, t = jax.device_get(count(batch))
    examples, tokens, steps = examples + int(e), tokens + float(t), steps + 1
own = sum(float(b["loss_mask"].sum()) for b in feed.eval.iterator())
print("RESULT " + json.dumps({"examples": examples, "tokens": tokens, "steps": steps, "own_tokens": own,
                              "own_examples": feed.eval.report["split_kept"]}), flush=True)
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from flacuna_jax import demo_assets

    path = tmp_path_factory.mktemp("train_data") / "sample.jsonl"
    demo_assets.write_sample(str(path), demo_assets.make_records(400))
    return str(path)


def _run(sample, tokenizer, out, processes, devices_per_process):
    # 400 records x 0.0125 = 5 held-out examples: 2 global eval batches of 4 rows (one per device), the
    # second padded; one row per example (no packing) makes examples countable by segment.
    args = [f"output_dir={out}", f"model.path={tokenizer}", f"tokenizer.path={tokenizer}", f"data.sources=[{sample}]",
            "data.packing=false", "data.eval_fraction=0.0125", "train.seq_len=2048", "train.global_batch_size=4",
            "train.per_device_batch_size=1", "train.steps=1", "eval.max_batches=0", "mesh.fsdp=-1",
            f"data.cache_dir={out}/cache"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
                   PYTHONPATH=str(ROOT))
        if processes > 1:
            env.update(COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=str(processes), PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        text = p.communicate(timeout=300)[0]
        assert p.returncode == 0, text[-3000:]
        results.append(json.loads(text.split("RESULT ")[-1]))
    return results


def test_multi_host_eval_scores_every_example_once(sample, char_tokenizer_dir, tmp_path):
    hosts = _run(sample, char_tokenizer_dir, tmp_path, 2, 2)
    for h in hosts:  # global sums: every host sees the same totals, after the same number of steps
        assert h["own_examples"] == 5 and h["own_tokens"] > 0
        assert (h["examples"], h["tokens"], h["steps"]) == (5, h["own_tokens"], 2)
