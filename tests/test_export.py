"""Merged HF export: bit-identical round trip with B = 0, transformers loads it and agrees with the
JAX adapted model and with PeftModel on the exported adapter; dtypes, shards, tokenizer files; and
`score --adapter` against scoring the merged dir."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from flacuna_jax import export, hf, lora, peft_io, score, tiny
from flacuna_jax.config import LORA_TARGETS
from flacuna_jax.model import LoraSpec
from tests.helpers import hf_logits, hf_reference
from tests.test_peft import random_factors

LOGIT_TOL = 1e-4


def _tensors(model_dir):
    src = hf.TensorSource(model_dir)
    return {n: np.asarray(src.get(n)) for n in src.names()}


def _assert_bit_identical(out, source_dir):
    got, want = _tensors(out), _tensors(source_dir)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert got[name].tobytes() == t.tobytes(), name


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_with_zero_b_is_bit_identical(tmp_path, dtype):
    config = tiny.PRESETS["gqa"]

    def tensors():  # some exact -0.0 entries in an adapted kernel: W + 0.0 would turn them into +0.0
        for name, t in tiny.random_hf_tensors(config, seed=5, dtype=dtype):
            if name == "model.layers.1.self_attn.q_proj.weight":
                t = t.copy()
                t[0, :5] = -0.0
            yield name, t

    source = tmp_path / "src"
    hf.write_hf_weights(source, tensors(), max_shard_size="40KB")
    (source / "config.json").write_text(json.dumps(hf.hf_config_dict(config, np.dtype(dtype).name)))
    spec = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS)
    model, base = hf.load_pretrained(source, lora=spec)  # fp32 params: a bf16 source is widened exactly
    factors = lora.init_lora_params(model, jax.random.key(0))  # PEFT init: A random, B = 0
    out = export.export_merged(tmp_path / "merged", source, factors, "lora", spec, max_shard_size="40KB")
    _assert_bit_identical(out, source)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == np.dtype(dtype).name
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1

    trained = lora.split_params(base, "full")[0]  # finetune=full: the params themselves are written
    _assert_bit_identical(export.export_merged(tmp_path / "full", source, trained, "full"), source)


def test_merged_dir_loads_in_transformers_and_matches(tiny_model_dir, char_tokenizer_dir, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir("gqa"), base_dir)
    for f in char_tokenizer_dir.iterdir():
        shutil.copy(f, base_dir / f.name)
    spec = LoraSpec(rank=4, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    model, base = hf.load_pretrained(base_dir, lora=spec)
    factors = random_factors(model.config, spec, seed=7)
    adapter = peft_io.save_adapter(tmp_path / "adapter", factors, spec, model.config.num_layers, str(base_dir))
    merged = export.export_merged(tmp_path / "merged", base_dir, factors, "lora", spec, max_shard_size="64KB")
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()
    assert (merged / "generation_config.json").is_file()

    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16)).astype(np.int32)
    ours = np.asarray(model.apply({"params": lora.merge_params(factors, base)}, ids))
    transformers_merged = hf_logits(hf_reference(merged), ids)
    peft = PeftModel.from_pretrained(hf_reference(base_dir), str(adapter))
    peft_logits = hf_logits(peft, ids)
    np.testing.assert_allclose(transformers_merged, ours, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(peft_logits, transformers_merged, atol=LOGIT_TOL, rtol=0)
    assert np.abs(ours - hf_logits(hf_reference(base_dir), ids)).max() > 100 * LOGIT_TOL

    reqs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("Q: ", "a longer continuation!")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in reqs))
    common = ["--data", str(tmp_path / "in.jsonl"), "--batch-size", "2"]
    score.main(["--model", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "a.jsonl"), *common])
    score.main(["--model", str(merged), "--out", str(tmp_path / "m.jsonl"), *common])
    with_adapter = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    with_merged = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    for a, m in zip(with_adapter, with_merged, strict=True):
        assert abs(a["loglik"] - m["loglik"]) <= 1e-4 and a["is_greedy"] == m["is_greedy"]
        assert a["num_tokens"] == m["num_tokens"]


def test_output_dtype_option_and_default(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("tied")
    spec = LoraSpec(rank=2, alpha=4.0, targets=("up_proj",))
    config = hf.load_hf_config(base_dir)
    factors = random_factors(config, spec, seed=3)
    out = export.export_merged(tmp_path / "bf16", base_dir, factors, "lora", spec, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    f32 = export.export_merged(tmp_path / "f32", base_dir, factors, "lora", spec)  # the base's dtype
    got, full = _tensors(out), _tensors(f32)
    assert "lm_head.weight" not in got  # tied embeddings stay tied
    for name, t in full.items():
        assert t.dtype == np.float32 and got[name].dtype == ml_dtypes.bfloat16
        assert got[name].tobytes() == t.astype(ml_dtypes.bfloat16).tobytes(), name
    a, b = factors["layers"]["mlp"]["up_proj"]["lora_a"][1], factors["layers"]["mlp"]["up_proj"]["lora_b"][1]
    src = np.asarray(hf.TensorSource(base_dir).get("model.layers.1.mlp.up_proj.weight"))
    np.testing.assert_allclose(full["model.layers.1.mlp.up_proj.weight"], src + 2.0 * b.T @ a.T, atol=1e-6)


def test_export_refusals(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("gqa")
    config = hf.load_hf_config(base_dir)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj",))
    factors = random_factors(config, spec)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_text("old")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_merged(tmp_path / "busy", base_dir, factors, "lora", spec)
    with pytest.raises(export.ExportError, match="r=8 needs"):
        export.export_merged(tmp_path / "o1", base_dir, factors, "lora", LoraSpec(8, 8.0, 0.0, ("q_proj",)))
    with pytest.raises(export.ExportError, match="dtype 'int8'"):
        export.export_merged(tmp_path / "o2", base_dir, factors, "lora", spec, dtype="int8")
    with pytest.raises(export.ExportError, match="finetune=full needs every weight"):
        export.export_merged(tmp_path / "o3", base_dir, factors, "full")
