"""Hugging Face LLaMA directories <-> Flax parameters, streamed tensor by tensor.

Import reads `config.json` into a `LlamaConfig`, takes the parameter shapes from `jax.eval_shape`
(nothing allocated), then builds each parameter with `jax.make_array_from_callback`: every device
shard is read straight out of the mmapped safetensors file, so a 13B model lands FSDP-sharded on
its devices without a full copy anywhere. `.bin` checkpoints go only through torch's
`weights_only=True` loader. Export writes safetensors shards plus an index, one tensor at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from flacuna_jax.model import LlamaConfig, RopeScaling
from flacuna_jax.quant import is_quantized, load_quantized
from flacuna_jax.safetensors_io import SafetensorsFile, write_safetensors
from flacuna_jax.sharding import named_sharding


class CheckpointError(ValueError):
    """A Hugging Face directory is missing something or does not fit the model."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_LAYER_WEIGHTS = {  # our path under params["layers"] -> HF name inside model.layers.{i}
    ("input_norm", "scale"): "input_layernorm", ("post_attention_norm", "scale"): "post_attention_layernorm",
    ("attn", "q_proj", "kernel"): "self_attn.q_proj", ("attn", "k_proj", "kernel"): "self_attn.k_proj",
    ("attn", "v_proj", "kernel"): "self_attn.v_proj", ("attn", "o_proj", "kernel"): "self_attn.o_proj",
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj", ("mlp", "up_proj", "kernel"): "mlp.up_proj",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj",
}


# ---------------------------------------------------------------------------------------- config

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def config_from_hf(raw: dict, source: str = "config.json") -> LlamaConfig:
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} / architectures {archs} is not "
                              f"LLaMA-family (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported")
    if raw.get("hidden_act", "silu") != "silu":  # the MLP is SwiGLU: silu(gate) * up
        raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu)")
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")
    try:
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id", 2)
        return LlamaConfig(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"], num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048), bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, pad_token_id=raw.get("pad_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None


def load_hf_config(model_dir: str | Path) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    return config_from_hf(read_json(path), str(path))


def hf_config_dict(config: LlamaConfig, torch_dtype: str = "float32") -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": config.tie_word_embeddings, "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype,
    }
    s = config.rope_scaling
    if s is not None and s.kind == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s is not None:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    return d


# ------------------------------------------------------------------------------- name mapping

@dataclass(frozen=True)
class WeightSpec:
    """Where one of our parameters comes from: an HF tensor (per layer if `stacked`), maybe transposed."""

    path: tuple[str, ...]
    hf_name: str  # contains "{i}" when stacked
    stacked: bool
    transpose: bool


def weight_specs(config: LlamaConfig) -> list[WeightSpec]:
    specs = [WeightSpec(("embed_tokens",), "model.embed_tokens.weight", False, False)]
    for ours, theirs in _LAYER_WEIGHTS.items():
        specs.append(WeightSpec(("layers", *ours), f"model.layers.{{i}}.{theirs}.weight", True, ours[-1] == "kernel"))
    specs.append(WeightSpec(("norm", "scale"), "model.norm.weight", False, False))
    if not config.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", False, True))
    return specs


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------- reading

class TensorSource:
    """Name -> lazily read numpy tensor across the shards of an HF checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        st_index, st_single = self.dir / "model.safetensors.index.json", self.dir / "model.safetensors"
        bin_index, bin_single = self.dir / "pytorch_model.bin.index.json", self.dir / "pytorch_model.bin"
        if st_index.is_file():
            self._where = {k: self.dir / v for k, v in read_json(st_index)["weight_map"].items()}
        elif st_single.is_file():
            self._where = {k: st_single for k in self._file(st_single).keys()}
        elif bin_index.is_file():
            self._where = {k: self.dir / v for k, v in read_json(bin_index)["weight_map"].items()}
        elif bin_single.is_file():
            self._where = {k: bin_single for k in self._file(bin_single)}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")

    def _file(self, path: Path) -> Any:
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            self._open[path] = SafetensorsFile(path) if path.suffix == ".safetensors" else _load_bin(path)
        return self._open[path]

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        f = self._file(self._where[name])
        return f.get(name) if isinstance(f, SafetensorsFile) else f[name]


def _load_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: .bin checkpoints need torch (pip install torch) for its safe "
                              f"weights_only loader; or convert the checkpoint to safetensors") from None
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # the pickle names something other than tensors: never run it
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: torch's weights_only loader found more than tensors in this "
                              f"pickle (it could run code); convert the checkpoint to safetensors from a source "
                              f"you trust ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: to_numpy(v) for k, v in state.items()}


def _expected_hf_shape(spec: WeightSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    s = shape[1:] if spec.stacked else shape
    return tuple(reversed(s)) if spec.transpose else tuple(s)


def load_hf_params(model_dir: str | Path, shapes: Any, names: Any = None, mesh: Mesh | None = None,
                   dtype: Any = None) -> dict:
    """Frozen base parameters from an HF dir, each placed by its sharding as it is read.

    `shapes`/`names`: the trees from `model.abstract_params` (LoRA leaves are ignored). With no
    mesh, everything goes to the first device. `dtype` defaults to each abstract leaf's dtype.
    """
    src = TensorSource(model_dir)
    config = load_hf_config(model_dir)
    params: dict = {}
    for spec in weight_specs(config):
        leaf = _get(shapes, spec.path)
        if is_quantized(leaf):  # a decoder projection of a quantized base (model.base_quant)
            _set(params, spec.path, _quantized_leaf(src, spec, leaf, _get(names, spec.path) if names else None, mesh,
                                                    model_dir))
            continue
        n_layers = leaf.shape[0] if spec.stacked else None
        hf_names = [spec.hf_name.format(i=i) for i in range(n_layers)] if spec.stacked else [spec.hf_name]
        want = _expected_hf_shape(spec, leaf.shape)
        for name in hf_names:
            got = src.get(name).shape
            if tuple(got) != want:
                raise CheckpointError(f"{model_dir}: tensor {name!r} has shape {tuple(got)}, the model expects {want}")
        target = np.dtype(dtype or leaf.dtype)
        sharding = (named_sharding(mesh, _get(names, spec.path), leaf.shape) if mesh is not None
                    else SingleDeviceSharding(jax.devices()[0]))
        _set(params, spec.path, jax.make_array_from_callback(leaf.shape, sharding, _reader(src, spec, hf_names, target)))
    return params


def _quantized_leaf(src: TensorSource, spec: WeightSpec, leaf: Any, names: Any, mesh: Mesh | None, model_dir: Any) -> Any:
    """The stacked kernel quantized layer by layer from the HF tensors [out, in] (quant.load_quantized)."""
    first = jax.tree.leaves(leaf)[0]  # codes [l, out, in/2] or cb [l, out, in]
    n_layers, out = first.shape[:2]
    inp = first.shape[2] * (2 if first.dtype == np.uint8 else 1)
    hf_names = [spec.hf_name.format(i=i) for i in range(n_layers)]
    for name in hf_names:
        got = tuple(src.get(name).shape)
        if got != (out, inp):
            raise CheckpointError(f"{model_dir}: tensor {name!r} has shape {got}, the model expects {(out, inp)}")
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), leaf)
    else:
        shardings = jax.tree.map(lambda s, n: named_sharding(mesh, n, s.shape), leaf, names)
    return load_quantized(src.get, hf_names, leaf, shardings)


def _reader(src: TensorSource, spec: WeightSpec, hf_names: list[str], dtype: np.dtype) -> Callable:
    def read(index: tuple[slice, ...]) -> np.ndarray:
        if spec.stacked:
            layer_slice, rest = index[0], index[1:]
            chosen = hf_names[layer_slice]
        else:
            rest, chosen = index, hf_names
        parts = []
        for name in chosen:
            t = src.get(name)
            t = t.T if spec.transpose else t
            parts.append(np.asarray(t[rest], dtype=dtype))
        return np.stack(parts) if spec.stacked else parts[0]
    return read


# ---------------------------------------------------------------------------------- writing

def iter_hf_tensors(params: dict, config: LlamaConfig, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) one at a time, gathered from (possibly sharded) jax arrays."""
    dtype = np.dtype(dtype)
    for spec in weight_specs(config):
        arr = _get(params, spec.path)
        for i in range(arr.shape[0]) if spec.stacked else [None]:
            t = np.asarray(jax.device_get(arr[i] if spec.stacked else arr)).astype(dtype)
            yield spec.hf_name.format(i=i), np.ascontiguousarray(t.T if spec.transpose else t)


def parse_size(text: str | int) -> int:
    """Bytes in `text`, with transformers' units: 5GB = 5 * 10**9, 5GiB = 5 * 2**30."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?)B)?\s*", text.upper())
    if not m:
        raise ValueError(f"size {text!r} is not like 5GB, 40GiB, 500MB or 1000000")
    unit = 1 if m.group(2) is None else (1024 if m.group(3) else 1000) ** ("KMGT".index(m.group(2)) + 1)
    return int(float(m.group(1)) * unit)


def write_hf_weights(out_dir: str | Path, tensors: Iterator[tuple[str, np.ndarray]], max_shard_size: str | int = "5GB") -> None:
    """Safetensors shards (`model-0000k-of-0000n.safetensors`) + index, or one `model.safetensors`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    pending: list[tuple[str, np.ndarray]] = []
    pending_bytes = total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            write_safetensors(out / f"shard-{len(shards):05d}.tmp.safetensors", pending)
            shards.append([n for n, _ in pending])
            pending, pending_bytes = [], 0

    for name, t in tensors:
        if pending and pending_bytes + t.nbytes > limit:
            flush()
        pending.append((name, t))
        pending_bytes += t.nbytes
        total += t.nbytes
    flush()
    if len(shards) == 1:
        (out / "shard-00000.tmp.safetensors").replace(out / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{k:05d}.tmp.safetensors").replace(out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_pretrained(model_dir: str | Path, runtime: Any = None, lora: Any = None, mesh: Mesh | None = None,
                    ) -> tuple[Any, dict]:
    """(Llama module, frozen base params) for an HF dir; LoRA factors are added by `lora.py`."""
    from flacuna_jax.model import Llama, Runtime, abstract_params

    model = Llama(load_hf_config(model_dir), runtime or Runtime(), lora)
    shapes, names = abstract_params(model)
    return model, load_hf_params(model_dir, shapes, names, mesh)
