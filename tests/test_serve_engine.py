"""serve/engine.py and serve/adapters.py with plain calls (no HTTP): per-row adapters against PEFT,
continuous batching against transformers' generate one request at a time, cancellation, the queue
bound, seeded sampling, the shared-prefix prefill and tensor parallelism.

The model is the decisive tiny GQA model (tests.helpers.write_decisive_model): its top logit wins by
a wide margin, so greedy tokens compare exactly between implementations.
"""

import numpy as np
import pytest
import torch

from flacuna_jax.serve.engine import Event, QueueFull, Sampling
from tests.helpers import hf_logits
from tests.serve_fixtures import ADAPTERS, random_prompts, serve_args, transformers_references, write_served_model

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return write_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def loaded(served):
    from flacuna_jax.serve.__main__ import load_engine

    engine, prompts, models = load_engine(serve_args(served["model"], served["adapters"], max_batch=16))
    return engine, prompts, models


@pytest.fixture(scope="module")
def references(served):
    return transformers_references(served, "base")


def hf_greedy(ref, prompt, max_new, eos):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def run_until_done(engine, results, steps=10_000):
    for _ in range(steps):
        if all(c["finish_reason"] is not None for r in results.values() for c in r):
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def collector(results, key, n=1):
    """results[key][choice] = {"ids", "text", "finish_reason"}, filled by the engine's events."""
    results[key] = [{"ids": [], "text": "", "finish_reason": None} for _ in range(n)]

    def on_event(e: Event):
        c = results[key][e.choice]
        c["ids"] += e.token_ids
        c["text"] += e.text
        if e.finish_reason is not None:
            c["finish_reason"] = e.finish_reason

    return on_event


def submit(engine, results, key, prompt, choices, adapter=0):
    return engine.submit(prompt, choices, collector(results, key, len(choices)), lambda ids: "", adapter)


def test_bank_rows_equal_each_adapter_served_alone(loaded, references):
    """One batch, rows on the base and on adapters of different ranks and targets: each row's logits
    are that adapter's alone (PeftModel), the base rows the base's."""
    engine, _, models = loaded
    index = {m.id: m.adapter for m in models}
    names = ["base", "alpha", "beta", "alpha"]
    adapter_b = np.array([0 if n == "base" else index[n] for n in names], np.int32)
    ids = np.array(random_prompts([12] * 4, seed=5))
    ours = np.asarray(engine.model.apply({"params": engine.params}, ids, adapter_b=adapter_b))
    for row, name in enumerate(names):
        theirs = hf_logits(references[name], ids[row:row + 1])[0]
        assert np.abs(ours[row] - theirs).max() <= LOGIT_TOL, name
    assert np.abs(ours[1] - ours[0]).max() > 1.0 and np.abs(ours[2] - ours[0]).max() > 1.0  # the adapters matter
    assert engine.model.bank.rank == max(r for r, _, _ in ADAPTERS.values())  # ranks 4 and 2 padded to 4


def test_continuous_batching_equals_transformers_one_request_at_a_time(loaded, references):
    """8 requests of different lengths and adapters through 4 slots: four start, the rest are
    admitted as slots free up while the others keep decoding; an EOS that some rows reach early
    frees their slots. Every request's tokens are transformers' (or PEFT's) for it alone."""
    engine, _, models = loaded
    names = ["base", "alpha", "beta", "base", "beta", "alpha", "alpha", "base"]
    prompts = random_prompts([5, 13, 8, 30, 2, 17, 9, 40], seed=1)
    free_run = [hf_greedy(references[n], p, 16, eos=-1) for n, p in zip(names, prompts)]
    eos = free_run[1][5]  # a token request 1 emits midway: rows end at different steps
    expected = [x[:x.index(eos) + 1] if eos in x else x for x in free_run]  # greedy: generate stops at the first EOS
    assert len({len(x) for x in expected}) > 1
    index = {m.id: m.adapter for m in models} | {"base": 0}
    saved_eos, engine.eos_ids = engine.eos_ids, frozenset({eos})
    try:
        results = {}
        for k in range(3):  # three start together...
            submit(engine, results, k, prompts[k], [Sampling(16)], index[names[k]])
        for _ in range(3):
            engine.step()
        running = engine.counts()["running"]
        for k in range(3, 8):  # ...the rest arrive while they decode
            submit(engine, results, k, prompts[k], [Sampling(16)], index[names[k]])
        run_until_done(engine, results)
    finally:
        engine.eos_ids = saved_eos
    assert running == 3
    assert [results[k][0]["ids"] for k in range(8)] == expected
    # compiled once per shape, not per request: one prompt bucket; the cache grew from 4 to 8 rows
    assert engine.fns.prefill._cache_size() == 1 and engine.fns.step._cache_size() == 2
    assert [results[k][0]["finish_reason"] for k in range(8)] == ["stop" if x[-1] == eos else "length" for x in expected]
    assert engine.counts() == {"queued": 0, "running": 0, "slots": 16}


@pytest.mark.parametrize("long_slot", [0, 6])
def test_the_cache_has_the_rows_in_use(loaded, references, long_slot):
    """A burst of 9 requests grows the cache to 16 rows; once only one slot is busy the cache shrinks to
    one row (a step over spare rows costs more than a resize), that slot moved down to row 0 when it
    was another; every request's tokens are still transformers' for it alone."""
    engine, _, _ = loaded
    names = ["base", "alpha", "beta"] * 3
    prompts = random_prompts([7, 3, 12, 5, 9, 4, 6, 10, 8], seed=12)
    budgets = [3] * 9
    budgets[long_slot] = 30
    expected = [hf_greedy(references[n], p, b, eos=-1) for n, p, b in zip(names, prompts, budgets)]
    saved, engine.eos_ids = engine.eos_ids, frozenset()
    try:
        results, rows = {}, []
        for k, (p, n) in enumerate(zip(prompts, budgets)):
            submit(engine, results, k, p, [Sampling(n)], k % 3)
        while not all(c["finish_reason"] for r in results.values() for c in r):
            engine.step()
            rows.append(engine.rows)
            assert len(rows) < 1000
    finally:
        engine.eos_ids = saved
    assert [results[k][0]["ids"] for k in range(9)] == expected
    assert rows[0] == 16 and rows[-1] == 1 and set(rows) == {16, 1}


def test_cancel_frees_the_slot_and_the_queue_is_bounded(loaded):
    engine, _, _ = loaded
    saved = engine.max_queue
    engine.max_queue = 2
    try:
        results = {}
        a = submit(engine, results, "a", random_prompts([6])[0], [Sampling(50), Sampling(50)])
        b = submit(engine, results, "b", random_prompts([7])[0], [Sampling(50)])
        with pytest.raises(QueueFull):
            submit(engine, results, "c", [1, 2, 3], [Sampling(5)])
        engine.step()
        assert engine.counts() == {"queued": 0, "running": 3, "slots": 16}
        cancelled = engine.stats["requests_cancelled"]
        engine.cancel(a)
        seen = [len(c["ids"]) for c in results["a"]]
        engine.step()
        assert engine.counts()["running"] == 1  # a's two slots are free at once
        engine.cancel(b)
        engine.step()
        assert engine.counts()["running"] == 0 and [len(c["ids"]) for c in results["a"]] == seen  # nothing more for a
        assert engine.stats["requests_cancelled"] == cancelled + 2
    finally:
        engine.max_queue = saved


def test_seeded_choices_are_reproducible_whatever_shares_the_batch(loaded):
    """n choices: equal seeds give equal tokens, another seed others; the same request beside other
    requests (greedy and sampled, other adapters) gives the same tokens again."""
    engine, _, _ = loaded
    prompt = random_prompts([9], seed=7)[0]
    sampled = [Sampling(12, 1.0, 0.9, seed=11), Sampling(12, 1.0, 0.9, seed=11), Sampling(12, 1.0, 0.9, seed=12)]
    results = {}
    submit(engine, results, "alone", prompt, sampled)
    run_until_done(engine, results)
    submit(engine, results, "n1", random_prompts([20])[0], [Sampling(30)], 1)
    engine.step()
    submit(engine, results, "crowd", prompt, sampled)
    submit(engine, results, "n2", random_prompts([4])[0], [Sampling(30, 0.7)], 2)
    run_until_done(engine, results)
    alone = [c["ids"] for c in results["alone"]]
    assert alone[0] == alone[1] and alone[0] != alone[2] and len(alone[0]) == 12
    assert [c["ids"] for c in results["crowd"]] == alone


def test_registered_prefix_gives_the_full_prefill_tokens(loaded, references):
    engine, _, _ = loaded
    prefix = random_prompts([45], seed=9)[0]
    prompts = [prefix + rest for rest in random_prompts([3, 11, 1], seed=10)]
    expected = [hf_greedy(references["alpha"], p, 10, eos=-1) for p in prompts]
    engine.register_prefix(prefix)
    try:
        results = {}
        for k, p in enumerate(prompts):
            submit(engine, results, k, p, [Sampling(10)], 1)
        run_until_done(engine, results)
    finally:
        engine._prefixes.remove(tuple(prefix))
    assert list(engine._prefix_cache) == [(1, tuple(prefix))]  # prefilled once, for the adapter
    assert [results[k][0]["ids"] for k in range(3)] == expected


def test_tensor_parallel_engine_on_a_quantized_base(served):
    """--tensor 2 --base-quant int8: weights, adapters and the slots' cache split over two devices, the
    adapters' factors on top of the int8 kernels; the tokens of `load_for_inference` (the adapter kept
    beside the quantized base, as PEFT on a bitsandbytes base) on one device."""
    from flacuna_jax.generate import Generator
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.serve.__main__ import load_engine

    engine, _, _ = load_engine(serve_args(served["model"], served["adapters"], tensor=2, base_quant="int8"))
    assert len(engine.params["embed_tokens"].sharding.device_set) == 2
    assert len(engine.params["layers"]["attn"]["o_proj"]["bank_b"].sharding.device_set) == 2
    assert len(engine.cache["k"].sharding.device_set) == 2
    prompts = random_prompts([11, 5], seed=6)
    results = {}
    for k, p in enumerate(prompts):
        submit(engine, results, k, p, [Sampling(8)], 2)  # beta
    run_until_done(engine, results)
    model, params = load_for_inference(str(served["model"]), adapter=str(served["adapters"]["beta"]), base_quant="int8")
    expected = Generator(model, params, eos_ids=sorted(engine.eos_ids), batch_size=2).generate_ids(prompts, 8)
    assert [results[k][0]["ids"] for k in range(2)] == expected


def test_engine_thread_generate_and_stop(loaded):
    engine, _, _ = loaded
    engine.start()
    try:
        [choice] = engine.generate(random_prompts([5])[0], [Sampling(4)])
        assert len(choice["token_ids"]) == 4 and choice["finish_reason"] == "length"
    finally:
        engine.stop()
    assert not engine.alive


def test_a_training_run_is_served_as_an_adapter(served, tmp_path):
    """--run NAME=RUN_DIR: the run's LoRA factors in the bank give the logits of the run folded into the base."""
    import jax

    from flacuna_jax import checkpoint, hf, optim, train_state
    from flacuna_jax.config import Config, LoraConfig, OptimConfig, dump_config
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.lora import lora_shapes, merge_params
    from flacuna_jax.model import LoraSpec
    from flacuna_jax.serve.adapters import build_bank, load_adapters

    model, params = hf.load_pretrained(served["model"])
    spec = LoraSpec(rank=3, alpha=6.0, targets=("v_proj", "up_proj"))
    leaves, treedef = jax.tree.flatten(lora_shapes(model.clone(lora=spec)))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    factors = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    cfg = Config(output_dir=str(tmp_path), lora=LoraConfig(rank=3, alpha=6.0, targets=spec.targets))
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    ck = checkpoint.Checkpointer(tmp_path)
    ck.save(2, train_state.init_train_state(factors, optim.make_optimizer(OptimConfig(), 10)[0], 0), {})
    ck.close()
    adapters = load_adapters([], [f"trained={tmp_path}"], model.config, "base")
    assert [a.name for a in adapters] == ["trained"] and "step 2" in adapters[0].source
    bank, tree = build_bank(adapters, model.config)
    ids = np.array(random_prompts([10, 10], seed=8))  # row 0 on the run, row 1 on the base
    ours = np.asarray(model.clone(bank=bank).apply({"params": merge_params(tree, params)}, ids,
                                                   adapter_b=np.array([1, 0], np.int32)))
    folded_model, folded = load_for_inference(str(served["model"]), run=str(tmp_path))
    theirs = np.asarray(folded_model.apply({"params": folded}, ids))
    assert np.abs(ours[0] - theirs[0]).max() <= LOGIT_TOL  # the run's row
    assert np.abs(ours[1] - theirs[1]).max() > 1.0  # the base row is not the run's


def test_bad_adapter_arguments_name_the_flag(served, tmp_path):
    from flacuna_jax.hf import load_hf_config
    from flacuna_jax.serve.adapters import AdapterLoadError, load_adapters

    config = load_hf_config(served["model"])
    alpha = served["adapters"]["alpha"]
    with pytest.raises(AdapterLoadError, match="expected NAME=DIR"):
        load_adapters([str(alpha)], [], config, "base")
    with pytest.raises(AdapterLoadError, match="already taken"):
        load_adapters([f"base={alpha}"], [], config, "base")
    with pytest.raises(AdapterLoadError, match="not a directory"):
        load_adapters([f"x={tmp_path / 'missing'}"], [], config, "base")


def test_a_long_prompt_is_prefilled_at_a_multiple_of_the_step(served, references):
    """Prompt widths: powers of two up to PREFILL_STEP (64), then multiples of it; a 300-token prompt
    (prefilled at 320 columns, not 512) still gives transformers' tokens."""
    from flacuna_jax.serve.__main__ import load_engine
    from flacuna_jax.serve.engine import prompt_width

    engine, _, _ = load_engine(serve_args(served["model"], {}, max_model_len=512))
    widths = [prompt_width(n, engine.min_bucket) for n in (5, 64, 65, 128, 129, 300, 384, 385)]
    assert widths == [64, 64, 128, 128, 192, 320, 384, 448]
    prompt = random_prompts([300], seed=5)[0]
    engine.eos_ids = frozenset()
    results = {}
    submit(engine, results, 0, prompt, [Sampling(6)])
    run_until_done(engine, results)
    assert results[0][0]["ids"] == hf_greedy(references["base"], prompt, 6, eos=-1)
