"""LoRA partitioning: trainable/frozen split, PEFT-style init, counts from abstract shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import hf, lora
from flacuna_jax.config import LORA_TARGETS
from flacuna_jax.model import Llama, LoraSpec
from flacuna_jax.tiny import PRESETS


def test_13b_shape_with_paper_defaults_has_6553600_trainable():
    trainable, total = lora.count_params(Llama(PRESETS["llama_13b"], lora=LoraSpec(8, 16.0, 0.05, ("q_proj", "v_proj"))))
    assert trainable == 6_553_600
    assert total == 13_015_864_320 + 6_553_600


def test_full_finetune_trains_everything():
    trainable, total = lora.count_params(Llama(PRESETS["llama_7b"]), "full")
    assert trainable == total == 6_738_415_616


def test_split_merge_and_init(tiny_model_dir):
    spec = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS)
    model, base = hf.load_pretrained(tiny_model_dir("gqa"), lora=spec)
    factors = lora.init_lora_params(model, jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(factors)[0]
    assert len(flat) == 2 * len(LORA_TARGETS)
    for path, x in flat:
        name = path[-1].key
        assert x.dtype == jnp.float32
        if name == "lora_b":
            assert not np.asarray(x).any()
        else:
            bound = 1 / np.sqrt(x.shape[1])
            assert np.abs(np.asarray(x)).max() <= bound and np.asarray(x).std() > bound / 4
    params = lora.merge_params(factors, base)
    trainable, frozen = lora.split_params(params, "lora")
    assert jax.tree.structure(trainable) == jax.tree.structure(factors)
    assert jax.tree.structure(frozen) == jax.tree.structure(base)
    # B = 0: the adapted model is the base model, and folding changes nothing.
    ids = np.arange(12).reshape(2, 6)
    plain = hf.load_pretrained(tiny_model_dir("gqa"))[0]
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, ids)),
                                  np.asarray(plain.apply({"params": base}, ids)))
    folded = lora.fold_lora(params, spec)
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fold_equals_adapted_forward(tiny_model_dir):
    spec = LoraSpec(rank=4, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"))
    model, base = hf.load_pretrained(tiny_model_dir("mha"), lora=spec)
    factors = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.1,
                           lora.init_lora_params(model, jax.random.key(0)))
    params = lora.merge_params(factors, base)
    ids = np.arange(16).reshape(2, 8)
    adapted = model.apply({"params": params}, ids)
    plain = hf.load_pretrained(tiny_model_dir("mha"))[0]
    folded = plain.apply({"params": lora.fold_lora(params, spec)}, ids)
    assert np.abs(np.asarray(adapted) - np.asarray(folded)).max() <= 1e-5
