"""The paper's recipe planned ahead of time: per-device memory of 13B LoRA (configs/flacuna_13b.yaml:
seq 1280, 2 rows per device, bf16, remat) on 4 devices, against a 20 GB target.

    python -m benchmarks.plan_13b [--devices 4]

Runs `python -m flacuna_jax.plan --config configs/flacuna_13b.yaml --devices N --arch llama_13b
--json` in a subprocess (the planner sets XLA_FLAGS for N fake CPU devices before JAX starts; our
own fake-device flag, if any, is not passed on) and prints its JSON with `target_bytes` (20e9 per
device), `per_device_gb` and `meets_target`. No weights are needed or allocated. One JSON line.
"""

from __future__ import annotations

import argparse

from benchmarks.common import child_env, emit, run_json

TARGET_BYTES = 20e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--config", default="configs/flacuna_13b.yaml")
    a = p.parse_args(argv)
    plan = run_json(["-m", "flacuna_jax.plan", "--config", a.config, "--devices", str(a.devices),
                     "--arch", "llama_13b", "--json"], env=child_env())
    total = plan["per_device_bytes"]["total"]
    return emit({"benchmark": "plan_13b", "config": a.config, **plan, "target_bytes": TARGET_BYTES,
                 "per_device_gb": round(total / 1e9, 2), "meets_target": total <= TARGET_BYTES})


if __name__ == "__main__":
    main()
