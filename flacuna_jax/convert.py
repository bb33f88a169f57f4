"""Conversions out of (and between) training runs and Hugging Face formats.

    python -m flacuna_jax.convert export --run RUN_DIR [--step N] --out OUT --format peft|merged \\
        [--dtype float32|bfloat16|float16] [--max-shard-size 5GB] [--model BASE_DIR]
    python -m flacuna_jax.convert merge --model BASE_DIR --adapter PEFT_DIR --out OUT [--dtype ...]

`export --format peft` writes a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)
that `PeftModel.from_pretrained(base, OUT)` loads unchanged; `--format merged` writes a full HF dir
(config.json, generation_config.json, safetensors shards + index, the tokenizer files) that
`LlamaForCausalLM.from_pretrained(OUT)` loads, the LoRA factors folded in. A finetune=full run has
no adapter: only `merged` applies, and writes the trained weights. `merge` folds an existing PEFT
adapter into its base the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flacuna_jax.dtypes import FLOAT_DTYPES

EPILOG = """examples:
  export a run's latest checkpoint as a PEFT adapter:
    python -m flacuna_jax.convert export --run runs/demo --out build/demo/adapter --format peft
  export step 120 as a merged bf16 model in 2GB shards:
    python -m flacuna_jax.convert export --run runs/demo --step 120 --out build/demo/merged --format merged \\
        --dtype bfloat16 --max-shard-size 2GB
  fold an existing PEFT adapter into its base model:
    python -m flacuna_jax.convert merge --model vicuna-13b --adapter flacuna-adapter --out flacuna-13b-merged
"""


def export_run(run_dir: str | Path, out: str | Path, fmt: str, step: int | None = None, dtype: str | None = None,
               max_shard_size: str = "5GB", model_dir: str | Path | None = None) -> tuple[int, Path]:
    """(step exported, output dir) for a training run's checkpoint in `fmt` (peft | merged)."""
    from flacuna_jax.checkpoint import load_trainable
    from flacuna_jax.export import ExportError, export_merged
    from flacuna_jax.model import LoraSpec
    from flacuna_jax.peft_io import save_adapter

    step, trainable, cfg = load_trainable(run_dir, step)
    base = model_dir or cfg.model.path
    if fmt == "peft":
        if cfg.finetune != "lora":
            raise ExportError(f"{run_dir}: a finetune={cfg.finetune} run has no LoRA adapter; use --format merged")
        spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets))
        return step, save_adapter(out, trainable, spec, base_model_name_or_path=base or None,
                                  dtype=FLOAT_DTYPES[dtype or "float32"])
    if fmt != "merged":
        raise ExportError(f"--format must be peft or merged, got {fmt!r}")
    if not base:
        raise ExportError(f"{run_dir}: the run's config has no model.path; pass --model BASE_DIR")
    spec = None
    if cfg.finetune == "lora":
        spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, 0.0, tuple(cfg.lora.targets))
    tokenizer_dir = cfg.tokenizer.path if cfg.tokenizer.path and Path(cfg.tokenizer.path).is_dir() else None
    return step, export_merged(out, base, trainable, cfg.finetune, spec, dtype, max_shard_size, tokenizer_dir)


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out: str | Path, dtype: str | None = None,
                  max_shard_size: str = "5GB") -> Path:
    """A merged HF dir from a base model dir and a PEFT adapter dir."""
    from flacuna_jax.export import export_merged
    from flacuna_jax.hf import load_hf_config
    from flacuna_jax.peft_io import load_adapter

    spec, factors = load_adapter(adapter_dir, load_hf_config(model_dir))
    return export_merged(out, model_dir, factors, "lora", spec, dtype, max_shard_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.convert", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{export,merge}")
    e = sub.add_parser("export", help="a training run's checkpoint -> PEFT adapter dir or merged HF dir "
                                      "(e.g. export --run runs/demo --out adapter --format peft)",
                       description="A training run's checkpoint -> PEFT adapter dir or merged HF dir.")
    e.add_argument("--run", required=True, help="training output_dir (holds config.yaml and checkpoints/)")
    e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--format", required=True, choices=("peft", "merged"))
    e.add_argument("--dtype", choices=FLOAT_DTYPES,
                   help="tensor dtype (default: merged -> the base checkpoint's, peft -> float32)")
    e.add_argument("--max-shard-size", default="5GB", help="merged: largest safetensors shard (default 5GB)")
    e.add_argument("--model", help="base HF dir (default: the run's model.path)")
    m = sub.add_parser("merge", help="fold a PEFT adapter into its base model "
                                     "(e.g. merge --model base --adapter adapter --out merged)",
                       description="Fold a PEFT LoRA adapter into its base model: a full HF dir.")
    m.add_argument("--model", required=True, help="base HF LLaMA dir")
    m.add_argument("--adapter", required=True, help="PEFT adapter dir")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--dtype", choices=FLOAT_DTYPES, help="tensor dtype (default: the base checkpoint's)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    return p


def main(argv: list[str] | None = None) -> None:
    from flacuna_jax.checkpoint import CheckpointNotFound
    from flacuna_jax.config import ConfigError
    from flacuna_jax.export import ExportError
    from flacuna_jax.hf import CheckpointError, parse_size
    from flacuna_jax.peft_io import AdapterError

    p = build_parser()
    a = p.parse_args(argv)
    try:
        parse_size(a.max_shard_size)
    except ValueError as e:
        p.error(f"--max-shard-size: {e}")
    try:
        if a.command == "export":
            step, out = export_run(a.run, a.out, a.format, a.step, a.dtype, a.max_shard_size, a.model)
            print(f"exported step {step} of {a.run} as {a.format} -> {out}")
        else:
            out = merge_adapter(a.model, a.adapter, a.out, a.dtype, a.max_shard_size)
            print(f"merged {a.adapter} into {a.model} -> {out}")
    except (CheckpointNotFound, ConfigError, ExportError, CheckpointError, AdapterError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
