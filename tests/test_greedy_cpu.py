"""greedy_cpu.py: the half-precision screen's tokens are the float logits' first-index argmax, where
the screen and the float order disagree, at exact ties and near ties, past 48 candidates (the full
logits then), for hidden states that are not finite, for weights half cannot hold, and in the decoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import generate, greedy_cpu, hf, matmul_cpu, tiny
from flacuna_jax.generate import Generator
from flacuna_jax.model import unrolled
from tests.helpers import needs_compiler

pytestmark = needs_compiler


def screened(output_kv: np.ndarray) -> dict:
    output = jnp.asarray(output_kv, jnp.float32)
    packed = matmul_cpu.pack(output)
    params = {"output_packed": packed, "output_screen": greedy_cpu.screen_weights(packed, output)}
    assert greedy_cpu.usable(params) is None
    return params


def float_argmax(h_bd, params, vocab_size) -> np.ndarray:
    """The first index of the maximum of the model's float logits (the packed output projection)."""
    return np.argmax(np.asarray(greedy_cpu.logits(jnp.asarray(h_bd), params, vocab_size)), axis=-1)


def screen(h_bd, params) -> np.ndarray:
    return np.asarray(jax.jit(greedy_cpu.screen_tokens)(jnp.asarray(h_bd, jnp.float32), params))


def drawn(h_bd, params, vocab_size) -> np.ndarray:
    """What the decoder draws greedily: the screen, and the full logits where it cannot settle a row."""
    fn = jax.jit(lambda h: generate.sample_from_hidden(h, params, vocab_size, jax.random.key(0), jnp.float32(0),
                                                       jnp.float32(1)))
    return np.asarray(fn(jnp.asarray(h_bd, jnp.float32)))


# depth x vocabulary x rows: a depth past a chunk of 128 and not a multiple of 16, a vocabulary short
# of a panel and a ragged last panel, one row and a decode batch
@pytest.mark.parametrize("k, vocab, rows", [(576, 4800, 1), (130, 97, 3), (64, 1000, 16), (200, 30, 5)])
def test_screen_tokens_are_the_float_argmax(k, vocab, rows):
    rng = np.random.default_rng(k)
    params = screened(rng.normal(size=(k, vocab)).astype(np.float32) * 0.05)
    h = rng.normal(size=(rows, k)).astype(np.float32) * 3
    np.testing.assert_array_equal(screen(h, params), float_argmax(h, params, vocab))


def test_the_screen_keeps_a_column_that_rounding_to_half_puts_behind():
    """h = (1, -1); half rounds column 1 to (1 + 2^-10, 1) and column 2 to (1, 1): the screen has
    column 1 a whole half ulp ahead, yet in float column 2 is 0.01 ulp ahead. Only a bound as wide as
    half's rounding keeps column 2; the float recompute then picks it."""
    ulp = 2.0 ** -10
    output = np.zeros((2, 4), np.float32)
    output[:, 1] = [1 + 0.51 * ulp, 1 + 0.02 * ulp]
    output[:, 2] = [1 + 0.49 * ulp, 1 - 0.01 * ulp]
    params = screened(output)
    h = np.array([[1.0, -1.0]], np.float32)
    screen_logits = h @ output.astype(np.float16).astype(np.float32)
    assert np.argmax(screen_logits) == 1 and float_argmax(h, params, 4)[0] == 2
    assert screen(h, params)[0] == 2


def test_ties_and_near_ties_are_settled_as_the_float_argmax():
    """Columns equal in float (the first wins), and columns a few float ulps apart: half cannot tell
    them apart, so the float recompute decides, bit for bit as the full product."""
    rng = np.random.default_rng(0)
    k, vocab = 300, 500
    output = rng.normal(size=(k, vocab)).astype(np.float32) * 0.05
    h = rng.normal(size=(6, k)).astype(np.float32)
    best = np.argmax(h @ output, axis=-1)
    for row, column in enumerate(best):  # near copies of each row's best column, after and before it
        for j, place in enumerate(rng.choice(vocab, 6, replace=False)):
            if place != column:
                output[:, place] = output[:, column] * np.float32(1 + (j - 2) * 2.0 ** -22)
        output[:, (column + 7) % vocab] = output[:, column]  # an exact tie
    params = screened(output)
    np.testing.assert_array_equal(screen(h, params), float_argmax(h, params, vocab))


def test_past_48_candidates_the_step_computes_the_full_logits():
    """60 copies of one column, the 50th raised by a float ulp's worth: the screen cannot settle it
    (-1) and the draw falls back to the full logits' argmax."""
    rng = np.random.default_rng(1)
    k, vocab = 128, 300
    output = rng.normal(size=(k, vocab)).astype(np.float32) * 0.01
    h = np.abs(rng.normal(size=(1, k))).astype(np.float32)
    output[:, 100:160] = 0.5
    output[:, 149] = np.nextafter(np.float32(0.5), np.float32(1))
    params = screened(output)
    assert screen(h, params)[0] == -1
    assert float_argmax(h, params, vocab)[0] == 149 and drawn(h, params, vocab)[0] == 149


def test_hidden_states_that_are_not_finite_fall_back_to_the_full_logits():
    rng = np.random.default_rng(2)
    k, vocab = 64, 200
    params = screened(rng.normal(size=(k, vocab)).astype(np.float32))
    h = rng.normal(size=(3, k)).astype(np.float32)
    h[1, 5], h[2, 9] = np.nan, np.inf
    np.testing.assert_array_equal(screen(h, params), [float_argmax(h[:1], params, vocab)[0], -1, -1])
    full = np.asarray(jnp.argmax(greedy_cpu.logits(jnp.asarray(h), params, vocab), axis=-1))
    np.testing.assert_array_equal(drawn(h, params, vocab), full)


def test_weights_beyond_half_have_no_screen():
    output = jnp.ones((8, 20), jnp.float32).at[3, 4].set(70000.0)
    assert greedy_cpu.screen_weights(matmul_cpu.pack(output), output) is None
    assert greedy_cpu.usable({"output_packed": matmul_cpu.pack(output)}) == (
        "the params have no output screen (model.pack_output)")


@pytest.mark.parametrize("tied", [True, False])
def test_the_decoder_draws_greedy_tokens_through_the_screen(tmp_path, tied):
    """An unrolled model packed for the CPU has the screen (tied output projection or not); its
    decoder calls the screen, not the full output projection, in the loop, and generates the tokens it
    generates without the screen, and those of the model as loaded."""
    config = dataclasses.replace(tiny.PRESETS["gqa"], num_layers=2, tie_word_embeddings=tied)
    model, params = hf.load_pretrained(tiny.write_tiny_model(tmp_path / "model", config, seed=0))
    loaded = Generator(model, jax.tree.map(jnp.copy, params), eos_ids=(), batch_size=4)
    m, p = unrolled(model, params, "native")
    assert "output_screen" in p and p["output_screen"]["half"].dtype == jnp.float16
    prompts = [[5, 9, 2], [7], [3, 3, 8, 1, 4], [11, 2]]
    want = loaded.generate_ids(prompts, 10)
    with_screen = Generator(m, p, eos_ids=(), batch_size=4)
    without = Generator(m, {name: tree for name, tree in p.items() if name != "output_screen"}, eos_ids=(), batch_size=4)
    assert with_screen.generate_ids(prompts, 10) == without.generate_ids(prompts, 10) == want
    hlo = generate.make_decoder(m, generate.DecodeSpec(max_new_tokens=4, eos_ids=())).lower(
        p, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32), jax.random.key(0), jnp.float32(0),
        jnp.float32(1)).as_text()
    assert greedy_cpu.TARGET in hlo
