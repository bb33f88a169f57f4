"""Merged export: a full Hugging Face LLaMA directory with the LoRA factors folded into the base.

    W' = W + (alpha / r) * B_hf @ A_hf        (HF's [out, in] layout; ours is (A B)^T with A [in, r], B [r, out])

The base is streamed tensor by tensor out of its (mmapped) checkpoint, in HF's layer order: each
targeted projection is folded in fp32 and cast to the output dtype, every other tensor is only
cast. Nothing ever holds more than one tensor in fp32 plus the shard being written
(`max_shard_size`), so a 13B export needs a few GB of host memory, not 52.

When B is all zero the base tensor passes through untouched, so an export with dtype = the base's
is bit-identical to the source (no -0.0 -> +0.0 from adding zero). The output dtype defaults to the
base checkpoint's (`config.json` `torch_dtype` / `dtype`). For `finetune: full` the trained weights
themselves are written.

Writes: config.json (the base's, with the new dtype), generation_config.json, model.safetensors or
shards + model.safetensors.index.json, and the tokenizer files found in the tokenizer dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from flacuna_jax.dtypes import FLOAT_DTYPES
from flacuna_jax.hf import (CheckpointError, TensorSource, WeightSpec, config_from_hf, iter_hf_tensors, read_json,
                            weight_specs, write_hf_weights)
from flacuna_jax.model import LlamaConfig, LoraSpec
from flacuna_jax.peft_io import factor_shapes, factors_of, lora_path, to_host

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class ExportError(ValueError):
    """The export cannot be written as asked."""


def output_dtype(name: str | None, base_dir: str | Path) -> np.dtype:
    """`name` (float32|bfloat16|float16), or the base checkpoint's dtype when None."""
    if name is not None:
        if name not in FLOAT_DTYPES:
            raise ExportError(f"dtype {name!r}: choose one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[name]
    raw = read_json(Path(base_dir) / "config.json")
    declared = raw.get("torch_dtype") or raw.get("dtype")
    if declared in FLOAT_DTYPES:
        return FLOAT_DTYPES[declared]
    src = TensorSource(base_dir)  # undeclared ("auto" or absent): the embedding's stored dtype
    stored = np.dtype(src.get("model.embed_tokens.weight").dtype)
    return stored if stored in FLOAT_DTYPES.values() else FLOAT_DTYPES["float32"]


def _ordered(config: LlamaConfig) -> list[tuple[WeightSpec, int | None]]:
    """Every HF tensor as (spec, layer): embeddings, then layer by layer, then norm and lm_head."""
    specs = weight_specs(config)
    stacked = [s for s in specs if s.stacked]
    flat = [s for s in specs if not s.stacked]
    order = [(flat[0], None)]
    order += [(s, i) for i in range(config.num_layers) for s in stacked]
    return order + [(s, None) for s in flat[1:]]


def _lora_targets(spec: WeightSpec, lora: LoraSpec | None) -> str | None:
    if lora is None or spec.path[-1] != "kernel" or spec.path[0] != "layers":
        return None
    return spec.path[-2] if spec.path[-2] in lora.targets else None


def iter_merged_tensors(base_dir: str | Path, config: LlamaConfig, factors: dict | None, lora: LoraSpec | None,
                        dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) of the base with `factors` folded in, one tensor at a time."""
    dtype = np.dtype(dtype)
    src = TensorSource(base_dir)
    host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target in (lora.targets if lora else ()):
        node = factors_of(factors, target)
        a, b = to_host(node["lora_a"]), to_host(node["lora_b"])  # small: [layers, in, r], [layers, r, out]
        want = factor_shapes(config, target, lora.rank)
        if (a.shape, b.shape) != want:
            raise ExportError(f"{'/'.join(lora_path(target))}: lora_a {a.shape} / lora_b {b.shape}, the base model "
                              f"with r={lora.rank} needs {want[0]} / {want[1]}")
        host[target] = (a, b)
    for spec, i in _ordered(config):
        name = spec.hf_name.format(i=i)
        w = src.get(name)
        target = _lora_targets(spec, lora)
        if target is not None and np.any(host[target][1][i]):
            a, b = host[target]
            delta = (a[i].astype(np.float32) @ b[i].astype(np.float32)).T * np.float32(lora.scale)
            w = w.astype(np.float32) + delta
        yield name, np.ascontiguousarray(w.astype(dtype, copy=False))


def _check_full(params: dict, config: LlamaConfig) -> None:
    for spec in weight_specs(config):
        node: Any = params
        for p in spec.path:
            if not isinstance(node, dict) or p not in node:
                raise ExportError(f"the trained weights have no {'/'.join(spec.path)} (finetune=full needs every weight)")
            node = node[p]


def write_model_dir(out_dir: Path, base_dir: Path, tensors: Iterator[tuple[str, np.ndarray]], dtype: np.dtype,
                    max_shard_size: str | int, tokenizer_dir: Path | None = None) -> Path:
    raw = read_json(base_dir / "config.json")
    write_hf_weights(out_dir, tensors, max_shard_size)
    keys = [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]
    raw.update({k: dtype.name for k in keys})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    gen = base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, out_dir / gen.name)
    else:
        ids = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out_dir / gen.name).write_text(json.dumps(ids, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        f = (tokenizer_dir or base_dir) / name
        if f.is_file():
            shutil.copy(f, out_dir / name)
    return out_dir


def export_merged(out_dir: str | Path, base_dir: str | Path, trainable: dict, finetune: str = "lora",
                  lora: LoraSpec | None = None, dtype: str | None = None, max_shard_size: str | int = "5GB",
                  tokenizer_dir: str | Path | None = None) -> Path:
    """Writes the merged HF dir of a run: `trainable` is the LoRA tree (finetune=lora, with `lora`)
    or every weight (finetune=full), as numpy or jax arrays; `base_dir` the HF dir trained from."""
    out, base = Path(out_dir), Path(base_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty (stale shards would mix with the new ones)")
    try:
        config = config_from_hf(read_json(base / "config.json"), str(base / "config.json"))
        out_type = output_dtype(dtype, base)
    except CheckpointError as e:
        raise ExportError(f"base model: {e}") from None
    if finetune == "lora":
        if lora is None:
            raise ExportError("finetune=lora needs the LoraSpec (rank, alpha, targets) of the factors")
        tensors = iter_merged_tensors(base, config, trainable, lora, out_type)
    elif finetune == "full":
        _check_full(trainable, config)
        tensors = iter_hf_tensors(trainable, config, out_type)
    else:
        raise ExportError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    out.mkdir(parents=True, exist_ok=True)
    return write_model_dir(out, base, tensors, out_type, max_shard_size, Path(tokenizer_dir) if tokenizer_dir else None)
