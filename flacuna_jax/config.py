"""Typed run configuration: YAML file in, `key=value` overrides, validated, written back out.

Every section is a frozen dataclass. `load_config(path, overrides)` reads the YAML file, applies
the trailing `key=value` overrides (the value parsed as YAML, so `lora.targets='[q_proj, k_proj]'`
or `data.sources='[{path: a.json, weight: 2}]'` work), and builds the dataclasses. An unknown key or
a value of the wrong type is a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from etils import epath

from flacuna_jax.dtypes import FLOAT_DTYPES


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


@dataclass(frozen=True)
class SplashConfig:
    """Splash attention's tile sizes (multiples of 128; MaxText's sa_block_* defaults). A block larger than
    the sequence (padded to a multiple of 128), or not dividing it, shrinks to the largest multiple of
    128 that divides it."""

    block_q: int = 512  # forward: query rows per grid step
    block_kv: int = 512  # forward: key columns per grid step
    block_kv_compute: int = 512  # forward: key columns per inner matmul (divides block_kv)
    block_q_bwd: int = 512  # backward (dK/dV and dQ kernels): query rows
    block_kv_bwd: int = 512  # backward: key columns


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local Hugging Face LLaMA-family directory
    compute_dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"  # dtype of the frozen base weights
    remat: str = "full"  # none | full | dots_saveable
    # xla | dot_product (cuDNN flash attention; on a GPU an error if it cannot run, elsewhere XLA's, logged)
    # | splash (Pallas splash attention: TPUs; elsewhere the same kernel interpreted, slow, warned once)
    # | auto (splash on a TPU, cuDNN on a GPU where it can run, else XLA's implementation, the reason logged once)
    attention: str = "xla"
    splash: SplashConfig = field(default_factory=SplashConfig)
    base_quant: str = "none"  # none | int8 | nf4: the frozen decoder projections, as bitsandbytes (QLoRA)
    double_quant: bool = False  # nf4 only: quantize the block absmax too (bitsandbytes' compress_statistics)


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # default: model.path


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = ()
    packing: bool = True  # False: one example per row, padded (the original behaviour)
    on_bad_record: str = "error"  # error | skip (skips are counted and reported)
    overlong: str = "truncate"  # truncate | drop
    eval_fraction: float = 0.005
    split_seed: int = 0
    num_workers: int = 0
    cache_dir: str | None = None
    shuffle: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # default: one epoch
    seq_len: int = 1280
    global_batch_size: int = 128
    per_device_batch_size: int = 2
    epochs: int = 1
    max_nonfinite_steps: int = 5  # this many skipped (non-finite) updates in a row stop the run
    loss_chunk: int = 512  # positions per cross-entropy chunk (fp32 logits [b, chunk, vocab]); 0: no chunking


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 2e-5
    warmup_steps: int = 3000
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_from: str | None = None  # an existing PEFT adapter dir to start from


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 fills the remaining devices
    tensor: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # 0: only at the end (when there is held-out data or tasks)
    max_batches: int = 50  # held-out rows per evaluation, in global batches (0: all); the split's loss: eval_loss
    # Multiple-choice tasks scored as `python -m flacuna_jax.eval --task` scores them, e.g.
    # [mmlu=data/mmlu_anatomy.jsonl, bbh=data/bbh_navigate.jsonl]; logged as eval/<style>:<stem>/acc.
    # lm-evaluation-harness tasks as lm_eval:<task> (e.g. lm_eval:arc_easy), run by flacuna_jax.lm_eval
    # with k as --num_fewshot and max_examples as --limit; logged as eval/<task>/<metric>.
    tasks: tuple[str, ...] = ()
    lm_eval_include_path: str | None = None  # lm-eval's --include_path: a dir of your own task YAMLs
    k: int | None = None  # shots per prompt (default InstructEval's per style)
    max_examples: int | None = None  # questions scored per task


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    finetune: str = "lora"  # lora | full
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or self.model.path


BASE_QUANTS = ("none", "int8", "nf4")  # model.base_quant and the inference CLIs' --base-quant
_CHOICES = {
    "finetune": ("lora", "full"),
    "model.compute_dtype": tuple(FLOAT_DTYPES),
    "model.param_dtype": tuple(FLOAT_DTYPES),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.attention": ("xla", "dot_product", "splash", "auto"),
    "model.base_quant": BASE_QUANTS,
    "data.on_bad_record": ("error", "skip"),
    "data.overlong": ("truncate", "drop"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
}
_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
_AXIS = (lambda v: v > 0 or v == -1, "> 0 or -1 (fills the remaining devices)")
_LANES = (lambda v: v > 0 and v % 128 == 0, "a positive multiple of 128")
# Every numeric key and the values it accepts (NaN and infinities never; None where a key is
# optional means unset). tests/test_config.py checks that every numeric key is listed.
_RANGES = {
    "seed": _NONNEG,
    "data.eval_fraction": _UNIT, "data.split_seed": _NONNEG, "data.num_workers": _NONNEG,
    "train.steps": _POS, "train.seq_len": (lambda v: v >= 2, ">= 2"), "train.global_batch_size": _POS,
    "train.per_device_batch_size": _POS, "train.epochs": _POS, "train.max_nonfinite_steps": _POS,
    "train.loss_chunk": _NONNEG,
    "optim.lr": _POS, "optim.warmup_steps": _NONNEG, "optim.weight_decay": _NONNEG, "optim.clip_norm": _NONNEG,
    "optim.b1": _UNIT, "optim.b2": _UNIT, "optim.eps": _POS, "optim.momentum": _UNIT,
    "lora.rank": _POS, "lora.alpha": _POS, "lora.dropout": _UNIT,
    "mesh.data": _AXIS, "mesh.fsdp": _AXIS, "mesh.tensor": _AXIS,
    **{f"model.splash.{k}": _LANES for k in ("block_q", "block_kv", "block_kv_compute", "block_q_bwd", "block_kv_bwd")},
    "checkpoint.every": _POS, "checkpoint.keep": _POS, "log.every": _POS,
    "eval.every": _NONNEG, "eval.max_batches": _NONNEG, "eval.k": _NONNEG, "eval.max_examples": _POS,
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()})


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        if tp is DataSource and isinstance(value, str):
            return DataSource(path=value)
        return _build(tp, value, key + ".")
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-5" as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{key}': value {text!r} is not valid YAML ({e})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(flat: dict, key: str) -> Any:
    for part in key.split("."):
        flat = flat[part]
    return flat


def _validate(cfg: Config) -> None:
    flat = to_dict(cfg)
    for key, allowed in _CHOICES.items():
        value = _get(flat, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
    if cfg.model.base_quant != "none" and cfg.finetune != "lora":
        raise ConfigError(f"config key 'model.base_quant': {cfg.model.base_quant} keeps the base frozen; "
                          f"it needs finetune: lora, not {cfg.finetune}")
    if cfg.model.double_quant and cfg.model.base_quant != "nf4":
        raise ConfigError("config key 'model.double_quant': applies to model.base_quant: nf4 only")
    for t in cfg.lora.targets:
        if t not in LORA_TARGETS:
            raise ConfigError(f"config key 'lora.targets': unknown target {t!r} (known: {', '.join(LORA_TARGETS)})")
    for key, (ok, text) in _RANGES.items():
        value = _get(flat, key)
        if value is None:  # an optional key left unset
            continue
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"config key '{key}': must be {text}, got {value!r}")
    if cfg.model.splash.block_kv % cfg.model.splash.block_kv_compute:
        raise ConfigError(f"config key 'model.splash.block_kv_compute': {cfg.model.splash.block_kv_compute} does not "
                          f"divide model.splash.block_kv={cfg.model.splash.block_kv}")
    for i, s in enumerate(cfg.data.sources):
        if not (math.isfinite(s.weight) and s.weight >= 0):
            raise ConfigError(f"config key 'data.sources[{i}].weight': must be a finite number >= 0, got {s.weight}")


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML `path` (or defaults when None), applies `key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        path = epath.Path(path)  # a local file or a run's config.yaml in a bucket (storage.py)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(_merge(raw, parse_overrides(list(overrides))))


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML-serialisable data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
