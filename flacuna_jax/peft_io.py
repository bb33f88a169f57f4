"""PEFT LoRA adapter directories <-> our LoRA tree.

A PEFT adapter dir is `adapter_config.json` + `adapter_model.safetensors` holding, for every layer i
and targeted projection,

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

(`mlp.` instead of `self_attn.` for gate/up/down_proj). Our tree keeps the same factors stacked over
layers and transposed, beside the kernel they adapt: `tree["layers"]["attn"]["q_proj"]["lora_a"]`
[layers, in, r] and `lora_b` [layers, r, out]. Both sides scale by alpha / r.

Writing refuses an adapter whose A factors are missing, all zero or not finite: PEFT would load such
a file without complaint and silently behave as the base model (seen in the field when sharded
parameters were saved without being gathered). Reading accepts what PEFT writes for plain LoRA on
LLaMA (safetensors; `adapter_model.bin` only through torch's `weights_only` loader) and names what
it cannot represent (DoRA, per-module ranks, partial layers, extra trained modules).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from flacuna_jax.config import LORA_TARGETS
from flacuna_jax.model import LlamaConfig, LoraSpec
from flacuna_jax.safetensors_io import SafetensorsFile, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
_BLOCK = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # target -> our module under "layers"
_HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")  # PEFT strips the adapter name; tolerate one that was kept


class AdapterError(ValueError):
    """An adapter directory or LoRA tree that cannot be written or read faithfully."""


def peft_key(layer: int, target: str, factor: str) -> str:
    """PEFT's state-dict key of factor "A" or "B" of `target` in decoder layer `layer`."""
    return f"base_model.model.model.layers.{layer}.{_HF_BLOCK[_BLOCK[target]]}.{target}.lora_{factor}.weight"


def lora_path(target: str) -> tuple[str, str, str]:
    """Where `target`'s factors live in our tree: ("layers", "attn"|"mlp", target)."""
    if target not in _BLOCK:
        raise AdapterError(f"unknown LoRA target {target!r} (known: {', '.join(LORA_TARGETS)})")
    return ("layers", _BLOCK[target], target)


def factor_shapes(config: LlamaConfig, target: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Our (lora_a, lora_b) shapes for `target`: [layers, in, r], [layers, r, out]."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    in_out = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[target]
    return (config.num_layers, in_out[0], rank), (config.num_layers, rank, in_out[1])


def factors_of(tree: dict, target: str) -> dict:
    node: Any = tree
    for p in lora_path(target):
        if not isinstance(node, dict) or p not in node:
            raise AdapterError(f"the LoRA tree has no factors for {target} (missing {'/'.join(lora_path(target))})")
        node = node[p]
    missing = [k for k in ("lora_a", "lora_b") if k not in node]
    if missing:
        raise AdapterError(f"the LoRA tree has no {missing[0]} for {target}")
    return node


def to_host(x: Any) -> np.ndarray:
    """A whole (small) factor on this host, gathered across processes when it is not addressable here."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


# ------------------------------------------------------------------------------------------ write

def adapter_config_dict(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict:
    """`adapter_config.json` as PEFT (0.21) writes it for plain LoRA on a causal LM."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": list(spec.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "exclude_modules": None, "layer_replication": None, "revision": None,
    }


def iter_adapter_tensors(tree: dict, spec: LoraSpec, num_layers: int | None = None, dtype: Any = np.float32
                         ) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT key, tensor in PEFT's layout) for every layer and target; checks A as it goes.

    `num_layers` defaults to the leading axis of the first target's lora_a."""
    if not spec.targets:
        raise AdapterError("the LoraSpec names no targets: nothing to write")
    if num_layers is None:
        num_layers = int(np.shape(factors_of(tree, spec.targets[0])["lora_a"])[0])
    for target in spec.targets:
        node = factors_of(tree, target)
        a, b = to_host(node["lora_a"]), to_host(node["lora_b"])
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != num_layers or b.shape[0] != num_layers \
                or a.shape[2] != spec.rank or b.shape[1] != spec.rank:
            raise AdapterError(f"{target}: lora_a {a.shape} / lora_b {b.shape} do not fit {num_layers} layers of "
                               f"rank {spec.rank} ([layers, in, r] / [layers, r, out])")
        for i in range(num_layers):
            a_i = a[i].astype(np.float32)
            if not np.isfinite(a_i).all() or not np.isfinite(b[i].astype(np.float32)).all():
                raise AdapterError(f"refusing to write the adapter: {target} of layer {i} has non-finite values")
            if not np.any(a_i):
                raise AdapterError(f"refusing to write the adapter: lora_A of {target} in layer {i} is all zeros "
                                   f"(an empty adapter: were sharded parameters saved without being gathered?)")
            yield peft_key(i, target, "A"), np.ascontiguousarray(a[i].T.astype(dtype))
            yield peft_key(i, target, "B"), np.ascontiguousarray(b[i].T.astype(dtype))


def save_adapter(out_dir: str | Path, tree: dict, spec: LoraSpec, num_layers: int | None = None,
                 base_model_name_or_path: str | None = None, dtype: Any = np.float32) -> Path:
    """Writes a PEFT adapter dir that `PeftModel.from_pretrained(base, out_dir)` loads unchanged."""
    out = Path(out_dir)
    tensors = list(iter_adapter_tensors(tree, spec, num_layers, dtype))  # every check before any file is written
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    config = adapter_config_dict(spec, base_model_name_or_path)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ------------------------------------------------------------------------------------------- read

def read_adapter_spec(adapter_dir: str | Path) -> tuple[LoraSpec, dict]:
    """(LoraSpec, raw adapter_config.json) with every unsupported PEFT option named."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path} not found (not a PEFT adapter directory)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r}, only LORA is supported")
    unsupported = {"use_dora": bool(raw.get("use_dora")), "rank_pattern": bool(raw.get("rank_pattern")),
                   "alpha_pattern": bool(raw.get("alpha_pattern")), "modules_to_save": bool(raw.get("modules_to_save")),
                   "layers_to_transform": raw.get("layers_to_transform") is not None,
                   "fan_in_fan_out": bool(raw.get("fan_in_fan_out")), "lora_bias": bool(raw.get("lora_bias")),
                   "bias": raw.get("bias", "none") != "none", "layer_replication": bool(raw.get("layer_replication"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"{path}: {', '.join(f'{k}={raw.get(k)!r}' for k in bad)} is not supported "
                           f"(plain LoRA on the attention/MLP projections only)")
    try:
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: missing or invalid r / lora_alpha ({e})") from None
    if raw.get("use_rslora"):  # PEFT scales by alpha/sqrt(r); as alpha'/r that is alpha' = alpha*sqrt(r)
        alpha = alpha * math.sqrt(rank)
    return LoraSpec(rank, alpha, float(raw.get("lora_dropout") or 0.0), ()), raw


def _read_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    st, bin_ = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_BIN
    if st.is_file():
        f = SafetensorsFile(st)
        return {k: f.get(k) for k in f.keys()}
    if bin_.is_file():
        from flacuna_jax.hf import CheckpointError, _load_bin  # torch.load(weights_only=True): never unpickles code

        try:
            return _load_bin(bin_)
        except CheckpointError as e:
            raise AdapterError(str(e)) from None
    raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN})")


def _configured_targets(raw: Any, found: list[str], where: Path) -> tuple[str, ...]:
    """The targets in adapter_config.json's order when it lists plain names, else in canonical order."""
    if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        named = [t.split(".")[-1] for t in raw]
        unknown = sorted(set(named) - set(LORA_TARGETS))
        if unknown:
            raise AdapterError(f"{where}: target_modules {unknown} are not LLaMA projections "
                               f"(supported: {', '.join(LORA_TARGETS)})")
        if set(named) != set(found):
            raise AdapterError(f"{where}: target_modules {sorted(set(named))} but the weights hold factors for "
                               f"{sorted(found)}")
        return tuple(dict.fromkeys(named))
    return tuple(t for t in LORA_TARGETS if t in found)  # a regex or "all-linear": the weights decide


def load_adapter(adapter_dir: str | Path, config: LlamaConfig) -> tuple[LoraSpec, dict]:
    """(LoraSpec, LoRA tree of fp32 numpy arrays) from a PEFT adapter dir, checked against `config`.

    The tree has exactly the structure of `lora.lora_shapes(Llama(config, lora=spec))`, so it can
    seed training (`lora.init_from`) or be folded into the base (`lora.fold_lora`).
    """
    adapter_dir = Path(adapter_dir)
    spec, raw = read_adapter_spec(adapter_dir)
    tensors = _read_tensors(adapter_dir)
    parsed: dict[tuple[str, int, str], np.ndarray] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"{adapter_dir}: tensor {key!r} is not a LoRA factor of a LLaMA projection")
        layer, block, target, factor = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if target not in _BLOCK or _HF_BLOCK[_BLOCK[target]] != block:
            raise AdapterError(f"{adapter_dir}: tensor {key!r}: {block}.{target} is not a LLaMA projection")
        parsed[(target, layer, factor)] = t
    found = sorted({t for t, _, _ in parsed}, key=LORA_TARGETS.index)
    if not found:
        raise AdapterError(f"{adapter_dir}: the adapter holds no LoRA factors")
    targets = _configured_targets(raw.get("target_modules"), found, adapter_dir / ADAPTER_CONFIG)
    spec = LoraSpec(spec.rank, spec.alpha, spec.dropout, targets)
    tree: dict = {}
    for target in targets:
        a_shape, b_shape = factor_shapes(config, target, spec.rank)
        a = np.empty(a_shape, np.float32)
        b = np.empty(b_shape, np.float32)
        for i in range(config.num_layers):
            for factor, dest, want in (("A", a, (a_shape[2], a_shape[1])), ("B", b, (b_shape[2], b_shape[1]))):
                t = parsed.pop((target, i, factor), None)
                if t is None:
                    raise AdapterError(f"{adapter_dir}: missing {peft_key(i, target, factor)}")
                if tuple(t.shape) != want:
                    raise AdapterError(f"{adapter_dir}: {peft_key(i, target, factor)} has shape {tuple(t.shape)}, "
                                       f"this model with r={spec.rank} expects {want}")
                dest[i] = np.asarray(t, np.float32).T
        node = tree.setdefault("layers", {}).setdefault(_BLOCK[target], {})
        node[target] = {"lora_a": a, "lora_b": b}
    if parsed:
        extra = sorted({layer for _, layer, _ in parsed})
        raise AdapterError(f"{adapter_dir}: factors for layers {extra} but the model has {config.num_layers} layers")
    return spec, tree
