"""QLoRA planned ahead of time on ONE device: 13B and 7B LoRA (seq 1280, 2 rows per device, remat full)
on an NF4 base, against 12 GB (13B) and 7 GB (7B).

    python -m benchmarks.plan_qlora [--config configs/flacuna_13b_qlora.yaml]

Runs `python -m flacuna_jax.plan --config CONFIG --devices 1 --arch llama_13b|llama_7b --json` in
subprocesses, once with the config as written and once as `configs/flacuna_13b.yaml` plus only
`model.base_quant=nf4` (the paper's config, its cuDNN attention counted as XLA's on this CPU), and
prints per-device GB for each with the verdicts. No weights are needed or allocated. One JSON line.
"""

from __future__ import annotations

import argparse

from benchmarks.common import child_env, emit, run_json

TARGETS = {"llama_13b": 12e9, "llama_7b": 7e9}


def planned(config: str, arch: str, *overrides: str) -> int:
    plan = run_json(["-m", "flacuna_jax.plan", "--config", config, "--devices", "1", "--arch", arch, "--json",
                     *overrides], env=child_env())
    return plan["per_device_bytes"]["total"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/flacuna_13b_qlora.yaml")
    a = p.parse_args(argv)
    result = {"benchmark": "plan_qlora", "config": a.config}
    for arch, target in TARGETS.items():
        total = planned(a.config, arch)
        paper = planned("configs/flacuna_13b.yaml", arch, "model.base_quant=nf4")
        result[arch] = {"per_device_gb": round(total / 1e9, 2), "target_gb": target / 1e9,
                        "meets_target": total <= target, "paper_config_nf4_gb": round(paper / 1e9, 2)}
    result["meets_target"] = all(result[arch]["meets_target"] for arch in TARGETS)
    return emit(result)


if __name__ == "__main__":
    main()
