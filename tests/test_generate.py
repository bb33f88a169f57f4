"""KV-cache generation against transformers' `generate(do_sample=False)` (token-identical), cache
logits against the full forward, sampling rules, and the CLI.

Random tiny models at the usual 0.02 init give near-uniform logits: greedy argmax then hinges on
1e-6 differences and a token comparison is a coin toss. The models here are written with larger
weights (`tests.helpers.write_decisive_model`), so the top logit wins by a wide margin and tokens are comparable.
"""

import dataclasses
import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flacuna_jax import hf, tiny
from flacuna_jax.generate import (MIN_SHARED, Codec, Generator, batch_prompt_width, bucket_width, chat, left_pad, main,
                                  make_prefill, plan_batches, sample_next, shared_prefix_len)
from flacuna_jax.lora import merge_params
from flacuna_jax.model import LoraSpec
from tests.helpers import CHAR_VOCAB, hf_reference, write_decisive_model

LOGIT_TOL = 1e-4

@pytest.fixture(scope="module")
def decisive_dir(tmp_path_factory):
    config = dataclasses.replace(tiny.PRESETS["gqa"], vocab_size=CHAR_VOCAB)
    return write_decisive_model(tmp_path_factory.mktemp("decisive"), config, seed=3)


@pytest.fixture(scope="module")
def loaded(decisive_dir):
    return hf.load_pretrained(decisive_dir)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, CHAR_VOCAB, n - 1).tolist() for n in lengths]


def _hf_generate(ref, prompts, max_new, eos):
    width = max(len(p) for p in prompts)
    ids, seg = left_pad(prompts, width, len(prompts))
    with torch.no_grad():
        out = ref.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(seg, dtype=torch.long), max_new_tokens=max_new,
                           do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = out[:, width:].numpy()
    return [[int(t) for t in r[:_end(r, eos)]] for r in rows]


def _end(row, eos):
    hits = np.flatnonzero(row == eos)
    return int(hits[0]) + 1 if len(hits) else len(row)


def _eos_reached_midway(gen, prompts, max_new):
    """An EOS id that some row emits a few tokens in: rows then stop at different steps."""
    free = Generator(gen.model, gen.params, eos_ids=(), batch_size=gen.batch_size)
    first = free.generate_ids(prompts, max_new)[0]
    return first[3]


@pytest.mark.parametrize("lengths", [[9], [5, 13, 8]], ids=["batch1", "left_padded"])
def test_greedy_matches_transformers(decisive_dir, loaded, lengths):
    model, params = loaded
    prompts = _prompts(lengths)
    gen = Generator(model, params, batch_size=4)  # 3 prompts -> one repeated filler row
    eos = _eos_reached_midway(gen, prompts, 16)
    gen = Generator(model, params, eos_ids=(eos,), batch_size=4)
    ours = gen.generate_ids(prompts, 16)
    theirs = _hf_generate(hf_reference(decisive_dir), prompts, 16, eos)
    assert ours == theirs
    assert ours[0][-1] == eos and len(ours[0]) < 16  # stopping at EOS was exercised
    assert len({len(x) for x in ours}) > 1 or len(ours) == 1


def _shared_prompts(prefix_len, rest_lengths, seed=1):
    """Prompts of one shared prefix (a few-shot header) and rests of their own."""
    prefix = _prompts([prefix_len], seed)[0]
    rng = np.random.default_rng(seed + 1)
    return [prefix + rng.integers(3, CHAR_VOCAB, n).tolist() for n in rest_lengths]


def test_plan_batches_groups_shared_prefixes():
    shared = _shared_prompts(MIN_SHARED + 8, [9, 2, 5, 7, 3])
    other = _prompts([50, 4, 30])
    prompts = [other[0], shared[0], other[1], shared[1], shared[2], other[2], shared[3], shared[4]]
    batches = plan_batches(prompts, 4)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(prompts)))  # each prompt once
    assert [b.indices for b in batches] == [[3, 7, 4, 6], [1], [2, 5, 0]]  # the shared run shortest first, then the rest by length
    assert [b.shared for b in batches] == [MIN_SHARED + 8, MIN_SHARED + 8, 0]  # the run's prefix, in each of its batches
    assert shared_prefix_len([shared[1], shared[1]]) == len(shared[1]) - 1  # a repeated prompt: all but its last id
    assert shared_prefix_len([other[0], other[2]]) == 0 and shared_prefix_len([shared[0]]) == 0


def test_shared_prefix_matches_transformers(decisive_dir, loaded, monkeypatch):
    """A run of prompts sharing a prefix prefills it once for all its batches; the tokens are
    transformers' on the whole prompts."""
    model, params = loaded
    prompts = _shared_prompts(MIN_SHARED + 13, [3, 11, 6, 8, 1])  # rests of several widths, padded after the prefix
    assert shared_prefix_len(prompts) == MIN_SHARED + 13
    gen = Generator(model, params, eos_ids=(), batch_size=2)  # three batches of one run
    import flacuna_jax.generate as generate

    prefilled = []
    real = generate.shared_prefill(model)
    monkeypatch.setattr(generate, "shared_prefill", lambda m: lambda p, ids, seg: prefilled.append(ids.shape) or real(p, ids, seg))
    ours = gen.generate_ids(prompts, 12)
    assert prefilled == [(1, 64)]  # once for the run: its 45 ids in a 64-wide bucket
    assert ours == _hf_generate(hf_reference(decisive_dir), prompts, 12, eos=-1)


def test_shared_prefix_logits_equal_full_prefill(loaded):
    model, params = loaded
    prompts = _shared_prompts(MIN_SHARED + 5, [2, 9, 5])
    shared = shared_prefix_len(prompts)
    decode = Generator(model, params, eos_ids=()).decoder(8, collect_logits=True)
    args = (jax.random.key(0), jnp.float32(0), jnp.float32(1))
    full = decode(params, *left_pad(prompts, bucket_width(max(map(len, prompts))), 3), *args)
    ids_1p, seg_1p = left_pad([prompts[0][:shared]], bucket_width(shared), 1)
    prefix = make_prefill(model)(params, ids_1p, seg_1p)
    rests = [p[shared:] for p in prompts]
    split = decode(params, *left_pad(rests, bucket_width(max(map(len, rests))), 3), *args, None, None, prefix)
    np.testing.assert_array_equal(np.asarray(split["tokens"]), np.asarray(full["tokens"]))
    assert np.abs(np.asarray(split["logits"]) - np.asarray(full["logits"])).max() <= LOGIT_TOL


def _random_lora(model, params, spec, seed=0):
    """Base params + LoRA factors with non-zero B (PEFT starts B at 0, which would test nothing)."""
    from flacuna_jax.lora import lora_shapes

    lora_model = model.clone(lora=spec)
    shapes = lora_shapes(lora_model)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    factors = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    return lora_model, merge_params(factors, params), factors


def _peft_reference(model_dir, spec, factors):
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(hf_reference(model_dir), LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                             target_modules=list(spec.targets)))
    layers = ref.base_model.model.model.layers
    with torch.no_grad():
        for target in spec.targets:
            a_lir = np.asarray(factors["layers"]["attn"][target]["lora_a"])
            b_lro = np.asarray(factors["layers"]["attn"][target]["lora_b"])
            for i, layer in enumerate(layers):
                proj = getattr(layer.self_attn, target)
                proj.lora_A["default"].weight.copy_(torch.from_numpy(a_lir[i].T.copy()))
                proj.lora_B["default"].weight.copy_(torch.from_numpy(b_lro[i].T.copy()))
    return ref.eval()


def test_greedy_with_lora_matches_peft(decisive_dir, loaded):
    model, params = loaded
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    lora_model, lora_params, factors = _random_lora(model, params, spec)
    prompts = _prompts([7, 12])
    base = Generator(model, params, eos_ids=(), batch_size=2).generate_ids(prompts, 12)
    ours = Generator(lora_model, lora_params, eos_ids=(), batch_size=2).generate_ids(prompts, 12)
    assert ours != base  # the adapter changes the output
    assert ours == _hf_generate(_peft_reference(decisive_dir, spec, factors), prompts, 12, eos=-1)


def test_cache_decode_logits_equal_full_forward(loaded):
    model, params = loaded
    prompts = _prompts([4, 11, 6])
    n_new = 10
    gen = Generator(model, params, eos_ids=())
    ids_bt, seg_bt = left_pad(prompts, bucket_width(11), 3)  # width 16: padding in every row
    result = gen.decoder(n_new, collect_logits=True)(params, ids_bt, seg_bt, jax.random.key(0),
                                                     jnp.float32(0), jnp.float32(1))
    tokens_bn, cached_bnv = np.asarray(result["tokens"]), np.asarray(result["logits"])
    full_ids = np.concatenate([ids_bt, tokens_bn], axis=1)
    full_seg = np.concatenate([seg_bt, np.ones_like(tokens_bn)], axis=1)
    positions = np.maximum(np.cumsum(full_seg, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(model.apply({"params": params}, full_ids, positions, full_seg))
    width = ids_bt.shape[1]
    expected_bnv = full[:, width - 1:width - 1 + n_new]  # the logits each new token was chosen from
    assert np.abs(cached_bnv - expected_bnv).max() <= LOGIT_TOL


def _hf_warped(logits, temperature, top_p):
    """What transformers' `generate(do_sample=True)` samples from: its temperature warper, then its
    top-p warper (added only when top_p < 1, as `_get_logits_processor` does)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(np.asarray(logits, np.float32)))
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


KEPT_SET_CASES = [  # (logits [b, v], temperature, top_p): the temperature decides what top-p keeps
    (np.log([[0.5, 0.2, 0.15, 0.1, 0.05]]), 0.5, 0.8),  # sharper: keeps {0, 1}
    (np.log([[0.5, 0.2, 0.15, 0.1, 0.05]]), 1.0, 0.8),  # keeps {0, 1, 2}
    (np.log([[0.5, 0.2, 0.15, 0.1, 0.05]]), 2.0, 0.8),  # flatter: keeps {0, 1, 2, 3}
    ([[1.0, 1.0, 1.0, 1.0, 0.5]], 1.0, 0.5),  # equal logits at the cut: which of them stays
    ([[0.0, 2.0, 2.0, 2.0, 0.0, 2.0, 2.0]], 0.7, 0.5),
    ([[3.0, -1.0, 0.5, 2.5], [0.0, 0.1, 0.2, 0.3]], 1.3, 0.9),  # rows are independent
    ([[30.0, 0.0, 0.0, -80.0, -200.0]], 1.0, 1.0),  # top_p = 1 keeps the float32 tail too
    ([[2.0, 1.0, 0.0, -1.0]], 5.0, 1e-3),  # only the top token, whatever the temperature
]


@pytest.mark.parametrize("logits,temperature,top_p", KEPT_SET_CASES)
def test_warped_logits_equal_transformers_warpers(logits, temperature, top_p):
    from flacuna_jax.generate import warp_logits

    ref = _hf_warped(logits, temperature, top_p)
    ours = np.asarray(warp_logits(jnp.asarray(logits, jnp.float32), jnp.float32(temperature), jnp.float32(top_p)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))  # the exact kept set
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_warped_logits_equal_transformers_on_a_large_vocabulary():
    """Random rows of a 2048-token vocabulary, drawn (first seed that qualifies) so that no token's
    cumulative probability lies within 2e-6 of the top-p cut: there, float32 rounding of either
    side's cumulative sum (torch sums in another order) may decide it."""
    from flacuna_jax.generate import warp_logits

    settings = ((0.6, 0.9), (1.0, 0.5), (1.7, 0.95))

    def clear_of_the_cut(logits):
        for temperature, top_p in settings:
            cum = torch.sort(torch.softmax(torch.tensor(logits).double() / temperature, -1), -1).values.cumsum(-1)
            if ((cum - (1 - top_p)).abs() <= 2e-6).any():
                return False
        return True

    logits = next(x for x in (np.random.default_rng(seed).normal(0.0, 3.0, (2, 2048)).astype(np.float32)
                              for seed in range(100)) if clear_of_the_cut(x))
    for temperature, top_p in settings:
        ref = _hf_warped(logits, temperature, top_p)
        ours = np.asarray(warp_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p)))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        assert 1 < np.isfinite(ref).sum(-1).min() and np.isfinite(ref).sum(-1).max() < 2048


def _chi2_sf(x, df):
    """P(X >= x) for a chi-square variable with df degrees of freedom (closed forms for integer df)."""
    import math

    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return math.exp(-x / 2) * total
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2)  # df = 1: erfc(sqrt(x / 2)); then + each odd step
    total, sf = 0.0, math.erfc(math.sqrt(x / 2))
    for k in range(3, df + 1, 2):
        total += term
        term *= x / k
    return sf + total


SAMPLING_LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5], np.float32)
SAMPLING_T, SAMPLING_P, DRAWS = 0.7, 0.92, 20000  # keeps 4 tokens; 5 at T=1 or after
FALSE_FAILURE = 1e-6  # the chance that a correct sampler's seeded draws fail the frequency check


def _probs(warped):
    e = np.exp(warped - warped.max())
    return e / e.sum()


def test_sampled_frequencies_follow_transformers_distribution():
    """20000 seeded draws from `sample_next` (temperature 0.7, top-p 0.92) against the distribution
    transformers samples from: no dropped token ever drawn, and a chi-square goodness-of-fit test
    over the kept tokens at a false-failure probability of 1e-6 (for a sampler that is right, over
    random seeds; the seed here is fixed, so the test is deterministic). The same logits under each
    plausible mistake (temperature ignored, inverted, applied after the top-p cut, or used for the cut
    but not for the draw) give another kept set or frequencies whose expected chi-square is over 10x
    the critical value: each fails."""
    expected = _probs(_hf_warped(SAMPLING_LOGITS[None], SAMPLING_T, SAMPLING_P)[0])
    kept = expected > 0
    rows = jnp.broadcast_to(jnp.asarray(SAMPLING_LOGITS), (DRAWS, SAMPLING_LOGITS.size))
    draws = np.asarray(sample_next(rows, jax.random.key(1), jnp.float32(SAMPLING_T), jnp.float32(SAMPLING_P)))
    counts = np.bincount(draws, minlength=SAMPLING_LOGITS.size)
    assert counts[~kept].sum() == 0 and kept.sum() >= 3
    stat = float((((counts - DRAWS * expected) ** 2)[kept] / (DRAWS * expected[kept])).sum())
    assert _chi2_sf(stat, int(kept.sum()) - 1) > FALSE_FAILURE, (counts, DRAWS * expected)

    critical = next(x / 10 for x in range(1, 10000) if _chi2_sf(x / 10, int(kept.sum()) - 1) < FALSE_FAILURE)
    top_p_first = _hf_warped(_hf_warped(SAMPLING_LOGITS[None], 1.0, SAMPLING_P), SAMPLING_T, 1.0)[0]
    for wrong in (_hf_warped(SAMPLING_LOGITS[None], 1.0, SAMPLING_P)[0],  # temperature ignored
                  _hf_warped(SAMPLING_LOGITS[None], 1 / SAMPLING_T, SAMPLING_P)[0],  # inverted
                  top_p_first,  # the cut made before dividing by the temperature
                  np.where(kept, SAMPLING_LOGITS, -np.inf)):  # the right cut, the draw from unscaled logits
        q = _probs(wrong)
        assert ((q > 0) != kept).any() or DRAWS * ((q - expected)[kept] ** 2 / expected[kept]).sum() > 10 * critical


def test_sampling_greedy_at_zero_temperature_and_per_draw_keys():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    assert int(sample_next(logits, jax.random.key(0), jnp.float32(0), jnp.float32(1))[0]) == 1
    keys = jax.random.split(jax.random.key(0), 64)
    draws = jax.vmap(lambda k: sample_next(logits, k, jnp.float32(1), jnp.float32(1.0))[0])(keys)
    assert set(np.asarray(draws).tolist()) == {0, 1, 2, 3}


def test_sampled_generation_is_seeded(loaded):
    model, params = loaded
    gen = Generator(model, params, eos_ids=(), batch_size=2)
    prompts = _prompts([6, 9])
    a = gen.generate_ids(prompts, 8, temperature=1.0, top_p=0.9, seed=7)
    assert a == gen.generate_ids(prompts, 8, temperature=1.0, top_p=0.9, seed=7)
    assert a != gen.generate_ids(prompts, 8, temperature=1.0, top_p=0.9, seed=8)


def test_cli_data_prompt_and_chat(decisive_dir, loaded, char_tokenizer_dir, tmp_path, capsys):
    from flacuna_jax.templates import encode_generation_prompt
    from flacuna_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(char_tokenizer_dir)
    data = tmp_path / "in.jsonl"
    texts = ["hi", "what is 2+2?", "tell me a story"]
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    common = ["--model", str(decisive_dir), "--tokenizer", str(char_tokenizer_dir), "--max-new-tokens", "6"]
    main(common + ["--data", str(data), "--out", str(out), "--batch-size", "2"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    model, params = loaded
    expected = Generator(model, params, batch_size=2).generate_ids(
        [encode_generation_prompt([], t, tok) for t in texts], 6)
    assert [r["prompt"] for r in rows] == texts
    assert [r["tokens"] for r in rows] == expected

    def chars(ids):  # the char tokenizer: one character per id
        return "".join(tok.convert_ids_to_tokens([i for i in ids if i != 2])).lstrip()

    assert [r["completion"] for r in rows] == [chars(x) for x in expected]

    main(common + ["--prompt", "hi"])
    assert capsys.readouterr().out == rows[0]["completion"] + "\n"  # streamed, then the newline

    gen = Generator(model, params)
    args = types.SimpleNamespace(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0, raw=False)
    transcript = io.StringIO()
    history = chat(gen, Codec(tok), args, inp=io.StringIO("hi\nagain\n"), out=transcript)
    assert history[0] == ("hi", rows[0]["completion"])
    second = gen.generate_ids([encode_generation_prompt([history[0]], "again", tok)], 6)[0]
    assert history[1] == ("again", chars(second))
    assert transcript.getvalue() == f"USER: ASSISTANT: {history[0][1]}\nUSER: ASSISTANT: {history[1][1]}\nUSER: "


def test_run_checkpoint_is_folded_for_decoding(decisive_dir, loaded, tmp_path):
    """--run: a training run's saved LoRA factors, folded into the base, decode as the unfolded model."""
    from flacuna_jax import checkpoint, optim, train_state
    from flacuna_jax.config import Config, LoraConfig, OptimConfig, dump_config
    from flacuna_jax.inference import load_for_inference

    model, params = loaded
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    lora_model, lora_params, factors = _random_lora(model, params, spec, seed=1)
    cfg = Config(output_dir=str(tmp_path), lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    tx, _ = optim.make_optimizer(OptimConfig(), 10)
    ck = checkpoint.Checkpointer(tmp_path)
    ck.save(3, train_state.init_train_state(factors, tx, 0), {})
    ck.close()
    folded_model, folded = load_for_inference(str(decisive_dir), run=str(tmp_path))
    assert folded_model.lora is None and "lora_a" not in str(jax.tree_util.tree_structure(folded))
    prompts = _prompts([6, 10])
    expected = Generator(lora_model, lora_params, eos_ids=(), batch_size=2).generate_ids(prompts, 10)
    assert Generator(folded_model, folded, eos_ids=(), batch_size=2).generate_ids(prompts, 10) == expected


def test_adapter_dir_matches_peft(decisive_dir, loaded, tmp_path):
    """--adapter: a PEFT adapter directory (saved by PEFT itself) decodes as PeftModel does."""
    pytest.importorskip("flacuna_jax.peft_io")
    from flacuna_jax.inference import load_for_inference

    model, params = loaded
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    _, _, factors = _random_lora(model, params, spec, seed=2)
    ref = _peft_reference(decisive_dir, spec, factors)
    ref.save_pretrained(str(tmp_path / "adapter"))
    adapted_model, adapted = load_for_inference(str(decisive_dir), adapter=str(tmp_path / "adapter"))
    prompts = _prompts([8, 5])
    ours = Generator(adapted_model, adapted, eos_ids=(), batch_size=2).generate_ids(prompts, 10)
    assert ours == _hf_generate(ref, prompts, 10, eos=-1)


def test_prompt_lengths_share_a_bucket(loaded):
    model, params = loaded
    gen = Generator(model, params, eos_ids=(), batch_size=2)
    for lengths in ([3, 9], [12, 16], [5, 5]):  # all within the 16-wide bucket: one compile
        gen.generate_ids(_prompts(lengths), 4)
    assert gen.decoder(4)._cache_size() == 1
    gen.generate_ids(_prompts([17, 2]), 4)
    assert gen.decoder(4)._cache_size() == 2


def test_prompt_widths_pad_at_most_a_third():
    """Powers of two and 1.5 times them: every prompt past the minimum is padded by under half its length."""
    widths = sorted({batch_prompt_width(n) for n in range(1, 1025)})
    assert widths == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert all(n <= batch_prompt_width(n) < 1.5 * n for n in range(17, 5000))
    assert batch_prompt_width(20, minimum=32) == 32 and batch_prompt_width(33, minimum=32) == 48
