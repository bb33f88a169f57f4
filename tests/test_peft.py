"""PEFT adapter dirs: logits and LoRA gradients against PEFT itself, key naming, refusals, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flacuna_jax import hf, lora, peft_io
from flacuna_jax.model import LORA_TARGETS, Llama, LoraSpec
from flacuna_jax.safetensors_io import SafetensorsFile, write_safetensors
from tests.helpers import hf_reference

LOGIT_TOL = 1e-4
GRAD_REL_TOL = 1e-4
CASES = [  # (targets, rank): the paper's default, all seven at both ranks, an MLP-heavy mix
    (("q_proj", "v_proj"), 4),
    (LORA_TARGETS, 16),
    (LORA_TARGETS, 4),
    (("k_proj", "o_proj", "up_proj", "down_proj"), 16),
]


def random_factors(config, spec, seed=0, std=0.3):
    """A LoRA tree with A and B both random (B != 0, so every factor has a gradient)."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for target in spec.targets:
        a_shape, b_shape = peft_io.factor_shapes(config, target, spec.rank)
        node = tree.setdefault("layers", {}).setdefault(peft_io.lora_path(target)[1], {})
        node[target] = {"lora_a": (std * rng.standard_normal(a_shape)).astype(np.float32),
                        "lora_b": (std * rng.standard_normal(b_shape)).astype(np.float32)}
    return tree


def _ids(vocab, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _jax_loss_and_grads(model, frozen, factors, ids):
    def loss_fn(trainable):
        logits = model.apply({"params": lora.merge_params(trainable, frozen)}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jax.tree.map(jnp.asarray, factors))
    return float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


def _peft_model(base_dir, adapter_dir, trainable=False):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_reference(base_dir), str(adapter_dir), is_trainable=trainable)


@pytest.mark.parametrize("targets,rank", CASES, ids=lambda v: str(v) if isinstance(v, int) else "+".join(v))
def test_logits_and_gradients_match_peft(tiny_model_dir, tmp_path, targets, rank):
    base_dir = tiny_model_dir("gqa")
    spec = LoraSpec(rank=rank, alpha=2.0 * rank if rank == 4 else 8.0, dropout=0.0, targets=targets)
    model, frozen = hf.load_pretrained(base_dir, lora=spec)
    factors = random_factors(model.config, spec, seed=rank)
    peft_io.save_adapter(tmp_path / "adapter", factors, spec, model.config.num_layers, str(base_dir))

    ids = _ids(model.config.vocab_size)
    loss, logits, grads = _jax_loss_and_grads(model, frozen, factors, ids)

    ref = _peft_model(base_dir, tmp_path / "adapter", trainable=True)
    out = ref(torch.as_tensor(ids[:, :-1], dtype=torch.long)).logits
    ref_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                 torch.as_tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    ref_loss.backward()
    np.testing.assert_allclose(logits, out.detach().numpy(), atol=LOGIT_TOL, rtol=0)
    base_logits = model.clone(lora=None).apply({"params": frozen}, ids[:, :-1])
    assert np.abs(logits - np.asarray(base_logits)).max() > 100 * LOGIT_TOL  # the adapter matters
    assert abs(loss - ref_loss.item()) <= LOGIT_TOL

    named = dict(ref.named_parameters())
    checked = 0
    for target in targets:
        g = grads["layers"][peft_io.lora_path(target)[1]][target]
        for i in range(model.config.num_layers):
            for factor, ours in (("A", g["lora_a"][i].T), ("B", g["lora_b"][i].T)):  # PEFT: A [r, in], B [out, r]
                key = peft_io.peft_key(i, target, factor).replace(".weight", ".default.weight")
                theirs = named[key].grad.numpy()
                assert ours.shape == theirs.shape
                rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
                assert rel <= GRAD_REL_TOL, (key, rel)
                checked += 1
    assert checked == 2 * len(targets) * model.config.num_layers


def test_written_keys_and_config_are_peft_s(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=4, alpha=16.0, dropout=0.05, targets=("q_proj", "down_proj"))
    factors = random_factors(config, spec)
    out = peft_io.save_adapter(tmp_path / "a", factors, spec, config.num_layers, "some/base")
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["bias"] == "none"
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"]) == (4, 16, 0.05)
    assert raw["target_modules"] == ["q_proj", "down_proj"] and raw["base_model_name_or_path"] == "some/base"
    cfg = LoraConfig.from_pretrained(str(out))
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "down_proj"}
    f = SafetensorsFile(out / "adapter_model.safetensors")
    assert f.shape("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight") == (4, 64)
    assert f.shape("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight") == (64, 4)
    assert len(f.keys()) == 2 * 2 * config.num_layers

    spec2, back = peft_io.load_adapter(out, config)
    assert spec2 == spec
    jax.tree.map(np.testing.assert_array_equal, back, factors)


def test_reads_an_adapter_peft_saved(tiny_model_dir, tmp_path):
    """PEFT's own save_pretrained (keys, transposes, config) -> our tree, and our model's structure."""
    from peft import LoraConfig, get_peft_model

    base_dir = tiny_model_dir("gqa")
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_reference(base_dir), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["v_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path / "a"))
    config = hf.load_hf_config(base_dir)
    spec, tree = peft_io.load_adapter(tmp_path / "a", config)
    assert (spec.rank, spec.alpha, set(spec.targets)) == (4, 8.0, {"v_proj", "gate_proj"})
    want = lora.lora_shapes(Llama(config, lora=spec))
    assert jax.tree.structure(tree) == jax.tree.structure(want)
    named = dict(peft_model.named_parameters())
    w = named["base_model.model.model.layers.1.mlp.gate_proj.lora_B.default.weight"].detach().numpy()
    np.testing.assert_array_equal(tree["layers"]["mlp"]["gate_proj"]["lora_b"][1], w.T)


def test_refuses_empty_or_missing_a(tiny_model_dir, tmp_path):
    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    factors = random_factors(config, spec)
    zeros = jax.tree.map(np.copy, factors)
    zeros["layers"]["attn"]["v_proj"]["lora_a"][1] = 0.0
    with pytest.raises(peft_io.AdapterError, match="lora_A of v_proj in layer 1 is all zeros"):
        peft_io.save_adapter(tmp_path / "a", zeros, spec, config.num_layers)
    assert not (tmp_path / "a").exists()  # nothing half-written
    missing = {"layers": {"attn": {"q_proj": factors["layers"]["attn"]["q_proj"]}}}
    with pytest.raises(peft_io.AdapterError, match="no factors for v_proj"):
        peft_io.save_adapter(tmp_path / "a", missing, spec, config.num_layers)
    with pytest.raises(peft_io.AdapterError, match="do not fit"):
        peft_io.save_adapter(tmp_path / "a", factors, LoraSpec(8, 8.0, 0.0, spec.targets), config.num_layers)


def test_clear_errors_on_mismatched_adapters(tiny_model_dir, tmp_path):
    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    out = peft_io.save_adapter(tmp_path / "a", random_factors(config, spec), spec, config.num_layers)
    other = hf.load_hf_config(tiny_model_dir("mha"))
    with pytest.raises(peft_io.AdapterError, match=r"v_proj.lora_B.weight has shape \(16, 4\), this model with r=4 expects \(64, 4\)"):
        peft_io.load_adapter(out, other)

    raw = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(peft_io.AdapterError, match="target_modules"):
        peft_io.load_adapter(out, config)
    (out / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(peft_io.AdapterError, match="use_dora"):
        peft_io.load_adapter(out, config)
    (out / "adapter_config.json").write_text(json.dumps(raw))

    f = SafetensorsFile(out / "adapter_model.safetensors")
    kept = [(k, np.array(f.get(k))) for k in f.keys() if "layers.2.self_attn.q_proj.lora_B" not in k]
    del f
    write_safetensors(out / "adapter_model.safetensors", kept)
    with pytest.raises(peft_io.AdapterError, match=r"missing base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_B"):
        peft_io.load_adapter(out, config)
    with pytest.raises(peft_io.AdapterError, match="not a PEFT adapter"):
        peft_io.load_adapter(tmp_path, config)


def test_reads_adapter_model_bin_through_weights_only(tiny_model_dir, tmp_path):
    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("o_proj",))
    factors = random_factors(config, spec)
    out = peft_io.save_adapter(tmp_path / "a", factors, spec, config.num_layers)
    f = SafetensorsFile(out / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(np.array(f.get(k))) for k in f.keys()}, out / "adapter_model.bin")
    del f
    (out / "adapter_model.safetensors").unlink()
    _, back = peft_io.load_adapter(out, config)
    jax.tree.map(np.testing.assert_array_equal, back, factors)


def test_saves_factors_sharded_over_devices(tiny_model_dir, tmp_path):
    """Factors split over 8 devices are gathered whole (the field's empty-adapter failure is a partial save)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=16, alpha=8.0, targets=("q_proj", "up_proj"))
    factors = random_factors(config, spec)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(None, None, "fsdp"))), factors)
    assert len(sharded["layers"]["attn"]["q_proj"]["lora_a"].addressable_shards) == 8
    out = peft_io.save_adapter(tmp_path / "a", sharded, spec)
    _, back = peft_io.load_adapter(out, config)
    jax.tree.map(np.testing.assert_array_equal, back, factors)
