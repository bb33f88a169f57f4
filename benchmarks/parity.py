"""Measured parity with the references: the numbers behind the README's correctness claims.

    python -m benchmarks.parity

fp32 on CPU, random tiny models (`flacuna_jax.tiny.PRESETS`, seed 1, written to a temporary dir):
- `logits`: max |our logits - transformers' LlamaForCausalLM logits| per preset (MHA, GQA, llama3 and
  linear rope scaling, tied embeddings, odd sizes), ids [2, 45];
- `peft`: LoRA with random A and B (B != 0) on the GQA preset, against PEFT loading our adapter dir:
  max |delta logits|, |delta loss| and the largest relative error (Frobenius) of any per-layer factor
  gradient, for each of `PEFT_CASES` (the paper's q_proj, v_proj; all seven projections; ...).
The tests assert each is <= 1e-4 (tests/test_model.py, tests/test_peft.py). One JSON line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import emit
from flacuna_jax.config import LORA_TARGETS

PRESETS = ("mha", "gqa", "llama3", "linear_rope", "tied", "odd")
PEFT_CASES = [  # (targets, rank, alpha): the paper's default, all seven at both ranks, an MLP-heavy mix
    (("q_proj", "v_proj"), 4, 8.0),
    (LORA_TARGETS, 16, 8.0),
    (LORA_TARGETS, 4, 8.0),
    (("k_proj", "o_proj", "up_proj", "down_proj"), 16, 8.0),
]


def random_factors(config, spec, seed: int = 0, std: float = 0.3) -> dict:
    """A LoRA tree with A and B both random (B != 0, so every factor has a gradient)."""
    from flacuna_jax import peft_io

    rng = np.random.default_rng(seed)
    tree: dict = {}
    for target in spec.targets:
        a_shape, b_shape = peft_io.factor_shapes(config, target, spec.rank)
        node = tree.setdefault("layers", {}).setdefault(peft_io.lora_path(target)[1], {})
        node[target] = {"lora_a": (std * rng.standard_normal(a_shape)).astype(np.float32),
                        "lora_b": (std * rng.standard_normal(b_shape)).astype(np.float32)}
    return tree


def _reference(model_dir):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def logit_delta(model_dir, ids: np.ndarray) -> float:
    """max |ours - transformers| of the logits of `ids`."""
    import torch

    from flacuna_jax import hf

    model, params = hf.load_pretrained(model_dir)
    ours = np.asarray(model.apply({"params": params}, ids))
    with torch.no_grad():
        theirs = _reference(model_dir)(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    return float(np.abs(ours - theirs).max())


def peft_deltas(base_dir, spec, adapter_dir, ids: np.ndarray, seed: int = 0) -> dict:
    """Our LoRA forward and factor gradients against PEFT's on the adapter dir we write: {logits (max
    |delta|), loss (|delta|), grad_rel (largest relative error of a factor), grads (how many compared),
    adapter_effect (max |logits with - without the adapter|: the comparison is not of two base models)}."""
    import jax
    import jax.numpy as jnp
    import torch
    from peft import PeftModel

    from flacuna_jax import hf, lora, peft_io

    model, frozen = hf.load_pretrained(base_dir, lora=spec)
    factors = random_factors(model.config, spec, seed)
    peft_io.save_adapter(adapter_dir, factors, spec, model.config.num_layers, str(base_dir))

    def loss_fn(trainable):
        logits = model.apply({"params": lora.merge_params(trainable, frozen)}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jax.tree.map(jnp.asarray, factors))
    base_logits = np.asarray(model.clone(lora=None).apply({"params": frozen}, ids[:, :-1]))

    ref = PeftModel.from_pretrained(_reference(base_dir), str(adapter_dir), is_trainable=True)
    out = ref(torch.as_tensor(ids[:, :-1], dtype=torch.long)).logits
    ref_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                 torch.as_tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    ref_loss.backward()
    named = dict(ref.named_parameters())
    rel = []
    for target in spec.targets:
        g = grads["layers"][peft_io.lora_path(target)[1]][target]
        for i in range(model.config.num_layers):
            for factor, ours in (("A", g["lora_a"][i].T), ("B", g["lora_b"][i].T)):  # PEFT: A [r, in], B [out, r]
                theirs = named[peft_io.peft_key(i, target, factor).replace(".weight", ".default.weight")].grad.numpy()
                if ours.shape != theirs.shape:
                    raise ValueError(f"{target} {factor} layer {i}: gradient shape {ours.shape} vs PEFT's {theirs.shape}")
                rel.append(float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)))
    logits = np.asarray(logits)
    return {"logits": float(np.abs(logits - out.detach().numpy()).max()), "loss": abs(float(loss) - ref_loss.item()),
            "grad_rel": max(rel), "grads": len(rel), "adapter_effect": float(np.abs(logits - base_logits).max())}


def main() -> dict:
    from flacuna_jax import tiny
    from flacuna_jax.model import LoraSpec

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {p: tiny.write_tiny_model(Path(tmp) / p, tiny.PRESETS[p], seed=1) for p in PRESETS}
        rng = np.random.default_rng(0)
        logits = {p: logit_delta(d, rng.integers(0, tiny.PRESETS[p].vocab_size, (2, 45)).astype(np.int32))
                  for p, d in dirs.items()}
        ids = np.random.default_rng(0).integers(0, tiny.PRESETS["gqa"].vocab_size, (2, 12)).astype(np.int32)
        peft = {}
        for targets, rank, alpha in PEFT_CASES:
            name = f"{'+'.join(targets) if targets != LORA_TARGETS else 'all seven'} r{rank} alpha {alpha:g}"
            spec = LoraSpec(rank=rank, alpha=alpha, dropout=0.0, targets=targets)
            peft[name] = peft_deltas(dirs["gqa"], spec, Path(tmp) / name.replace(" ", "_"), ids, seed=rank)
    return emit({"benchmark": "parity", "dtype": "float32", "tolerance": 1e-4,
                 "logits_max_abs_delta": logits, "logits_worst": max(logits.values()),
                 "peft": peft, "peft_worst": {k: max(v[k] for v in peft.values()) for k in ("logits", "loss", "grad_rel")}})


if __name__ == "__main__":
    main()
