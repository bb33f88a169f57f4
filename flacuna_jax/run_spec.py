"""What defines a run's checkpoints, stored with every checkpoint and checked on every resume.

A checkpoint holds trainable weights, optimizer state and a position in the data stream. What they
mean depends on a few config keys: the base model, the tokenizer, the fine-tuning mode and the
LoRA shape (`MODEL_KEYS`; export rebuilds the model from them, never from a later config.yaml), and
the data stream the position indexes into (`STREAM_KEYS`). Everything else (steps, learning rate,
mesh, batch layout, logging, ...) may change between launches. A resume whose defining keys differ
from the checkpoint's is refused with the keys named; `output_dir/config.yaml` is only written
once the config has passed that check.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flacuna_jax.config import Config, ConfigError, to_dict

MODEL_KEYS = ("model.path", "tokenizer.path", "finetune", "lora.rank", "lora.alpha", "lora.targets")
STREAM_KEYS = ("seed", "data.sources", "data.split_seed", "data.eval_fraction", "data.packing", "data.overlong",
               "data.shuffle", "train.seq_len")


def _get(flat: dict, key: str) -> Any:
    node = flat
    for part in key.split("."):
        node = node[part]
    return node


def run_spec(cfg: Config) -> dict[str, Any]:
    """The defining keys of `cfg` as plain JSON values (paths absolute, LoRA targets sorted)."""
    flat = to_dict(cfg)
    spec = {k: _get(flat, k) for k in MODEL_KEYS + STREAM_KEYS}
    spec["model.path"] = os.path.abspath(cfg.model.path) if cfg.model.path else ""
    spec["tokenizer.path"] = os.path.abspath(cfg.tokenizer_path) if cfg.tokenizer_path else ""
    spec["lora.targets"] = sorted(cfg.lora.targets)
    spec["lora.alpha"] = float(cfg.lora.alpha)
    if cfg.finetune != "lora":  # a full fine-tune has no LoRA shape
        for k in ("lora.rank", "lora.alpha", "lora.targets"):
            spec.pop(k)
    return spec


def check_resume(stored: dict[str, Any] | None, cfg: Config, where: str) -> None:
    """Raises ConfigError naming every defining key whose value differs from the checkpoint's."""
    if stored is None:
        return
    now = run_spec(cfg)
    differ = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    if differ:
        said = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, config {now.get(k)!r}" for k in differ)
        raise ConfigError(f"cannot resume {where}: its checkpoints were trained with other values of "
                          f"{', '.join(differ)} ({said}); restore them or use another output_dir")


def spec_overrides(spec: dict[str, Any]) -> list[str]:
    """`key=value` overrides that put a stored spec back onto a config (values as JSON, which YAML reads)."""
    return [f"{k}={json.dumps(v)}" for k, v in spec.items()]
