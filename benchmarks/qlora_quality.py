"""Quality of a quantized frozen base on a real model: held-out loss of bf16, NF4 and int8 bases, before
and after the same short LoRA fine-tune.

    .venv/bin/python -m benchmarks.qlora_quality [--model .cache/smollm2] [--steps 30] [--records 400]

Prints one JSON line. Model: SmolLM2-135M-Instruct (benchmarks/smollm2.py; its tokenizer adds no
BOS). Data: the embedded FLAN-Mini-style demo sample (`flacuna_jax.demo_assets`, `--records`
records), 10% held out by the training run's own split (seed 0): the same held-out rows for every
base. Each base is trained by `flacuna_jax.train` twice with the same config: once for one step at
lr 1e-30 (the config refuses lr 0; Adam moves LoRA's B, which starts at 0, by ~1e-30, far below
fp32's resolution of the loss, so its eval_loss is the base's own) and once for `--steps` steps; eval_loss is the token-mean cross-entropy over the held-out assistant tokens. The bases hold
the weights in bf16 (param_dtype) and compute in fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flacuna_jax.config import load_config
from flacuna_jax.demo_assets import write_demo_assets


BASE_LR = 1e-30  # "no update": see the module docstring


def eval_loss(model: str, sample: str, out: Path, base_quant: str, steps: int, lr: float, seq: int) -> float:
    from flacuna_jax import train

    cfg = load_config("configs/demo.yaml", [
        f"output_dir={out}", f"model.path={model}", "tokenizer.path=null", "model.compute_dtype=float32",
        "model.param_dtype=bfloat16", "model.remat=full", f"model.base_quant={base_quant}",
        f"data.sources=[{sample}]", "data.eval_fraction=0.1", f"train.steps={steps}", f"train.seq_len={seq}",
        "train.global_batch_size=4", "train.per_device_batch_size=4", "lora.rank=8", "lora.alpha=16",
        "lora.dropout=0.0", "lora.targets=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        f"optim.lr={lr}", "optim.warmup_steps=3", "optim.schedule=constant", f"checkpoint.every={steps}",
        f"log.every={steps}", "log.tensorboard=false", "eval.every=0", "eval.max_batches=100", "mesh.fsdp=1"])
    train.run(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["eval_loss"] for m in lines if "eval_loss" in m][-1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".cache/smollm2", help="HF dir (default: SmolLM2 from benchmarks/smollm2.py)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bases-only", action="store_true", help="only the bases' held-out losses (no fine-tune)")
    a = p.parse_args(argv)
    model = a.model
    if not Path(model, "config.json").is_file():
        from benchmarks.smollm2 import smollm2_dir

        model = str(smollm2_dir(model))
    result = {"benchmark": "qlora_quality", "model": model, "steps": a.steps, "records": a.records, "seq": a.seq}
    with tempfile.TemporaryDirectory(prefix="qlora_quality_") as tmp:
        sample = write_demo_assets(tmp, a.records)["sample"]
        for base in ("none", "nf4", "int8"):
            before = eval_loss(model, sample, Path(tmp) / f"{base}_0", base, 1, BASE_LR, a.seq)
            row = {"eval_loss_base": round(before, 4)}
            if not a.bases_only:
                row["eval_loss_after_lora"] = round(eval_loss(model, sample, Path(tmp) / f"{base}_lora", base, a.steps,
                                                              a.lr, a.seq), 4)
            result["bf16" if base == "none" else base] = row
    for base in ("nf4", "int8"):
        for k in [k for k in result["bf16"]]:
            result[base][k.replace("eval_loss", "delta_vs_bf16")] = round(result[base][k] - result["bf16"][k], 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
