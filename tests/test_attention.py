"""fused_attention's choice between cuDNN and XLA, on CPU: a GPU is simulated by the backend name
(cuDNN itself then refuses for real: "cuDNN is not detected"). The cuDNN kernel's numbers are
checked on a GPU by tests/test_gpu.py."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import attention as A
from flacuna_jax import hf
from flacuna_jax.model import Runtime


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(A, "_logged_fallbacks", set())
    caplog.set_level(logging.WARNING, logger=A.__name__)
    return lambda: [r.getMessage() for r in caplog.records if r.name == A.__name__]


def _qkv(dtype, t=8, h=4, k=2, f=16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, h, f), dtype)
    kk, v = (jax.random.normal(key, (1, t, k, f), dtype) for key in keys[1:])
    seg = jnp.ones((1, t), jnp.int32)
    return q, kk, v, A.attention_mask(seg, jnp.arange(t)[None], seg)


def test_fallback_is_logged_once_with_its_reason(fresh_log):
    q, k, v, mask = _qkv(jnp.float32)
    out = [A.fused_attention(q, k, v, mask, causal=True) for _ in range(2)]
    assert fresh_log() == ["attention: XLA's implementation instead of cuDNN flash attention: no cuDNN on the cpu backend"]
    np.testing.assert_array_equal(out[0], jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True))


def test_on_a_gpu_a_refusal_falls_back_logged_or_is_an_error_when_dot_product_was_asked(fresh_log, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v, mask = _qkv(jnp.bfloat16)
    assert A.cudnn_refusal(q) is None
    assert "compute dtype float32" in A.cudnn_refusal(q.astype(jnp.float32))
    assert "head_dim 160" in A.cudnn_refusal(jnp.zeros((1, 8, 4, 160), jnp.bfloat16))
    A.fused_attention(q, k, v, mask)  # cuDNN raises at trace time (none here): XLA's, logged
    A.fused_attention(q, k, v, mask)
    [line] = fresh_log()
    assert "cuDNN refused queries (1, 8, 4, 16) bfloat16: cuDNN is not detected" in line
    with pytest.raises(ValueError, match=r"^model.attention=dot_product: cuDNN flash attention cannot run: "
                                         r"cuDNN refused .*cuDNN is not detected"):
        A.fused_attention(q, k, v, mask, fallback=False)


def test_model_attention_setting_reaches_the_kernel(tiny_model_dir, fresh_log, monkeypatch):
    model, params = hf.load_pretrained(tiny_model_dir("gqa"))
    ids = jnp.zeros((1, 8), jnp.int32)
    auto = model.clone(runtime=Runtime(attention="auto")).apply({"params": params}, ids)
    assert len(fresh_log()) == 1  # one trace of the scanned layer
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="compute dtype float32"):
        model.clone(runtime=Runtime(attention="dot_product")).apply({"params": params}, ids)
    np.testing.assert_allclose(auto, model.apply({"params": params}, ids), atol=1e-4)
