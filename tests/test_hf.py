"""HF import: sharded safetensors onto a mesh, .bin through torch's safe loader, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import hf
from flacuna_jax.model import Llama, abstract_params
from flacuna_jax.sharding import logical_to_mesh_spec, make_mesh


def test_sharded_checkpoint_onto_2x4_mesh(tiny_model_dir):
    path = tiny_model_dir("gqa", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    model = Llama(hf.load_hf_config(path))
    shapes, names = abstract_params(model)
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    sharded = hf.load_hf_params(path, shapes, names, mesh)
    single = hf.load_hf_params(path, shapes, names)
    flat_names = dict(jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: isinstance(x, tuple))[0])
    for key, arr in jax.tree_util.tree_flatten_with_path(sharded)[0]:
        assert arr.sharding.spec == logical_to_mesh_spec(flat_names[key]), key
        assert len(arr.sharding.device_set) == 8
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]  # [layers, embed, heads]: fsdp x tensor
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 4)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16))
    out_sharded = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, ids)
    out_single = model.apply({"params": single}, ids)
    assert np.abs(np.asarray(out_sharded) - np.asarray(out_single)).max() <= 1e-5


def test_dtype_conversion_on_load(tiny_model_dir):
    path = tiny_model_dir("mha")
    shapes, _ = abstract_params(Llama(hf.load_hf_config(path)))
    params = hf.load_hf_params(path, shapes, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_bin_checkpoint_through_weights_only(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    src = tiny_model_dir("mha")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    state = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = Llama(hf.load_hf_config(src))
    shapes, _ = abstract_params(model)
    from_bin = hf.load_hf_params(tmp_path, shapes, dtype=jnp.float32)
    from_st = hf.load_hf_params(src, shapes, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


def test_bin_whose_pickle_runs_code_is_refused_and_nothing_runs(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tests.helpers import write_code_running_bin

    src = tiny_model_dir("mha")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    marker = tmp_path / "code_ran"
    path = write_code_running_bin(tmp_path / "pytorch_model.bin", load_file(src / "model.safetensors"), marker)
    with pytest.raises(hf.CheckpointError, match=r"pytorch_model\.bin: refused: .*weights_only") as e:
        hf.load_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a loader that unpickles code runs it
    assert marker.exists()


def test_remote_code_in_config_is_never_run(tiny_model_dir, char_tokenizer_dir, tmp_path):
    """auto_map in config.json / tokenizer_config.json: ignored where a standard class reads the
    checkpoint (our LLaMA, the fast tokenizer), refused in one line where only its code could;
    the module it names is never imported."""
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.tokenizer import TokenizerError, load_tokenizer
    from tests.helpers import write_remote_code

    d = _copy(tiny_model_dir("mha"), tmp_path / "m")
    _copy(char_tokenizer_dir, d)
    marker = tmp_path / "code_ran"
    write_remote_code(d, marker)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "custom_code.CustomTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    model, _ = load_for_inference(str(d))
    assert model.config == hf.load_hf_config(tiny_model_dir("mha"))
    tok = load_tokenizer(d)
    assert "custom_code" not in type(tok).__module__
    assert tok("a b")["input_ids"] == load_tokenizer(char_tokenizer_dir)("a b")["input_ids"]
    (d / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "CustomTokenizer"}))
    with pytest.raises(TokenizerError, match=r"needs its own code .* never runs") as e:
        load_tokenizer(d)
    assert "\n" not in str(e.value)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "custom", "architectures": ["CustomModel"]}))
    with pytest.raises(hf.CheckpointError, match="not LLaMA-family"):
        hf.load_pretrained(d)
    assert not marker.exists()


def test_bin_without_torch_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    import sys
    shutil.copy(tiny_model_dir("mha") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(hf.CheckpointError, match="need torch"):
        hf.TensorSource(tmp_path)


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(hf.CheckpointError, match="config.json"):
        hf.load_pretrained(tmp_path)


def test_not_llama(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("mha"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match="not LLaMA-family"):
        hf.load_pretrained(d)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"num_hidden_layers": None}, "missing key|num_hidden_layers"),
])
def test_unsupported_configs_are_refused_in_one_line(change, message):
    from flacuna_jax.tiny import PRESETS

    raw = {**hf.hf_config_dict(PRESETS["gqa"]), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(hf.CheckpointError, match=message):
        hf.config_from_hf(raw, "m/config.json")


def test_missing_tensor_and_shape_mismatch(tiny_model_dir, tmp_path):
    from flacuna_jax.safetensors_io import SafetensorsFile, write_safetensors

    d = _copy(tiny_model_dir("mha"), tmp_path / "m")
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    missing = dict(tensors)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    write_safetensors(d / "model.safetensors", missing)
    with pytest.raises(hf.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*missing"):
        hf.load_pretrained(d)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    write_safetensors(d / "model.safetensors", bad)
    with pytest.raises(hf.CheckpointError, match=r"k_proj.weight.*\(3, 64\).*\(64, 64\)"):
        hf.load_pretrained(d)


def test_hf_config_round_trip(tiny_model_dir):
    for preset in ("llama3", "linear_rope", "tied", "gqa"):
        path = tiny_model_dir(preset)
        config = hf.load_hf_config(path)
        assert hf.config_from_hf(hf.hf_config_dict(config)) == config
