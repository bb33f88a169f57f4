"""NF4 / int8 quantization against bitsandbytes (its CPU code paths), bit for bit."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
bnb_nn = pytest.importorskip("bitsandbytes.nn")

import jax.numpy as jnp  # noqa: E402

from flacuna_jax import quant  # noqa: E402

SHAPES = [(128, 64), (96, 80), (33, 17), (64, 256), (7, 9)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.31  # an outlier: other blocks' scale must not see it
    return w.to(dtype)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _np_bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.int16) if a.dtype.name == "bfloat16" else a


def test_code_books_are_bitsandbytes():
    assert np.array_equal(quant.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(quant.DYNAMIC_CODE, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_quantize_and_dequantize_equal_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours_packed, ours_absmax = quant.nf4_quantize_flat(w.float().numpy())
    assert np.array_equal(ours_packed, packed.numpy().reshape(-1))
    assert np.array_equal(ours_absmax, state.absmax.numpy())
    if shape[1] % 64 == 0:  # the model's layout: blocks within rows
        leaf = quant.quantize_oi(w.float().numpy(), "nf4", jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
        ours = leaf.dequantize(jnp.float32 if dtype == torch.float32 else jnp.bfloat16)
        theirs = F.dequantize_4bit(packed, state)
        assert np.array_equal(_np_bits(np.asarray(ours).T), _bits(theirs))


@pytest.mark.parametrize("shape,dtype", [((128, 64), torch.float32), ((256, 192), torch.bfloat16), ((64, 1024), torch.float32)])
def test_nf4_double_quant_dequantizes_as_bitsandbytes(shape, dtype):
    """From bitsandbytes' own nested state our dequantization is bit-exact; given its offset (torch's
    fp32 mean) our nested codes and absmax2 are its own; our mean is within one ulp of torch's."""
    w = _weight(shape, dtype, seed=3)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out, inp = shape
    leaf = quant.NF4Weight(jnp.asarray(packed.numpy().reshape(out, inp // 2)),
                           jnp.asarray(state.absmax.numpy().reshape(out, inp // 64)),
                           jnp.asarray(state.state2.absmax.numpy()), jnp.asarray(state.offset.numpy()),
                           "bfloat16" if dtype == torch.bfloat16 else "float32")
    ours = leaf.dequantize(jnp.float32 if dtype == torch.float32 else jnp.bfloat16)
    assert np.array_equal(_np_bits(np.asarray(ours).T), _bits(F.dequantize_4bit(packed, state)))

    _, plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    absmax = plain.absmax.numpy()
    q2, absmax2, _ = quant.nested_quantize(absmax, offset=np.float32(state.offset.item()))
    assert np.array_equal(q2, state.absmax.numpy()) and np.array_equal(absmax2, state.state2.absmax.numpy())
    _, _, offset = quant.nested_quantize(absmax)  # our own mean: torch's to the last bit
    assert abs(float(offset) - state.offset.item()) <= np.spacing(np.float32(offset))


def test_nested_codes_equal_bitsandbytes_on_many_blocks():
    """The lookup-table rule on 40 960 absmax of real-like spread, against bitsandbytes' CPU kernel."""
    g = torch.Generator().manual_seed(11)
    absmax = (torch.rand(40960, generator=g) ** 3 * 0.2 + 1e-3).float()
    out, state = F.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    q2, absmax2, _ = quant.nested_quantize(absmax.numpy(), offset=np.float32(absmax.mean().item()))
    assert np.array_equal(q2, out.numpy()) and np.array_equal(absmax2, state.absmax.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 80), (33, 17), (64, 256)])
def test_int8_equals_int8params(shape, dtype):
    w = _weight(shape, dtype, seed=5)
    p = bnb_nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    leaf = quant.quantize_oi(w.float().numpy(), "int8", jnp.float32)
    assert np.array_equal(leaf.cb, p.CB.numpy()) and np.array_equal(leaf.scb, p.SCB.numpy())
    theirs = F.int8_vectorwise_dequant(p.CB, p.SCB)
    assert np.array_equal(np.asarray(leaf.dequantize(jnp.float32)).T, theirs.numpy())


def test_nf4_refuses_rows_that_straddle_blocks():
    with pytest.raises(quant.QuantError, match="multiples of 64"):
        quant.quantize_oi(np.zeros((8, 80), np.float32), "nf4", jnp.float32)
