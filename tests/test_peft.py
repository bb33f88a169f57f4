"""PEFT adapter dirs: logits and LoRA gradients against PEFT itself, key naming, refusals, errors."""

import json

import jax
import numpy as np
import pytest
import torch

from benchmarks.parity import PEFT_CASES, peft_deltas, random_factors
from flacuna_jax import hf, lora, peft_io
from flacuna_jax.model import Llama, LoraSpec
from flacuna_jax.safetensors_io import SafetensorsFile, write_safetensors
from tests.helpers import hf_reference

LOGIT_TOL = 1e-4
GRAD_REL_TOL = 1e-4


def _ids(vocab, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _peft_model(base_dir, adapter_dir, trainable=False):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_reference(base_dir), str(adapter_dir), is_trainable=trainable)


@pytest.mark.parametrize("targets,rank,alpha", PEFT_CASES, ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v))
def test_logits_and_gradients_match_peft(tiny_model_dir, tmp_path, targets, rank, alpha):
    """The measurement `python -m benchmarks.parity` prints: our LoRA forward and every factor's gradient
    against PEFT loading the adapter dir we write."""
    spec = LoraSpec(rank=rank, alpha=alpha, dropout=0.0, targets=targets)
    config = hf.load_hf_config(tiny_model_dir("gqa"))
    d = peft_deltas(tiny_model_dir("gqa"), spec, tmp_path / "adapter", _ids(config.vocab_size), seed=rank)
    assert d["logits"] <= LOGIT_TOL and d["loss"] <= LOGIT_TOL and d["grad_rel"] <= GRAD_REL_TOL, d
    assert d["adapter_effect"] > 100 * LOGIT_TOL  # the adapter matters
    assert d["grads"] == 2 * len(targets) * config.num_layers


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


def test_adapter_bin_whose_pickle_runs_code_is_refused_and_nothing_runs(tiny_model_dir, tmp_path):
    from tests.helpers import write_code_running_bin

    config = hf.load_hf_config(tiny_model_dir("gqa"))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("o_proj",))
    out = peft_io.save_adapter(tmp_path / "a", random_factors(config, spec), spec, config.num_layers)
    f = SafetensorsFile(out / "adapter_model.safetensors")
    tensors = {k: torch.from_numpy(np.array(f.get(k))) for k in f.keys()}
    del f
    (out / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    write_code_running_bin(out / "adapter_model.bin", tensors, marker)
    with pytest.raises(peft_io.AdapterError, match=r"adapter_model\.bin: refused: .*weights_only"):
        peft_io.load_adapter(out, config)
    assert not marker.exists()
    torch.load(out / "adapter_model.bin", weights_only=False)  # the payload is live
    assert marker.exists()


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
