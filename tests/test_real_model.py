"""The real SmolLM2-135M-Instruct (benchmarks/smollm2.py) loads into our model and equals transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import hf_logits, hf_reference

pytestmark = pytest.mark.real


def test_smollm2_logits_equal_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    from flacuna_jax.inference import load_for_inference

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = np.asarray([tok("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    assert ids[0, 0] != tok.bos_token_id  # a byte-level BPE tokenizer that adds no BOS
    model, params = load_for_inference(str(smollm2_dir))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    ref = hf_logits(hf_reference(smollm2_dir), ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert tok.decode(int(ours[0, -1].argmax())).strip() == "Rome"
