"""The `flacuna_jax` lm-eval backend against lm-eval's own HF backend (`--model hf`) on the same checkpoint.

Tasks are lm-eval YAMLs written here over local JSON files (nothing is downloaded): multiple choice
(acc, acc_norm), generate_until (exact_match, and every generated text) and a rolling-loglikelihood
perplexity task, and loglikelihood tasks whose continuations are, half of them, the reference's greedy
decoding (so `is_greedy` and its `acc` are both True and False). The model is a decisive random LLaMA
(tests.helpers.write_decisive_model) with a window of 64 tokens, so few-shot contexts are
left-truncated and documents span several windows. Every field is compared: log-likelihoods and
perplexities (1e-4 relative), is_greedy, acc, acc_norm, exact_match and each generated text (equal),
for the base model, `adapter=` (PEFT's PeftModel on the hf side), `run=` (a training checkpoint of the
same factors) and `base_quant=nf4` (the hf side holding bitsandbytes' quantize/dequantize round trip of
the same weights in fp32, not its bf16 CPU matmul), with the adapter on top.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from flacuna_jax import tiny
from tests.helpers import CHAR_VOCAB, greedy_requests, hf_reference, write_decisive_model

LOGLIK_RTOL = 1e-4
WINDOW = 64
WORDS = ("red", "green", "blue", "a cat", "the dog", "seven", "tea", "an old map", "river", "x", "quiet night")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, char_tokenizer_dir):
    config = dataclasses.replace(tiny.PRESETS["mha"], vocab_size=CHAR_VOCAB, max_position_embeddings=WINDOW)
    path = write_decisive_model(tmp_path_factory.mktemp("lm_eval_model"), config, seed=7)
    for f in char_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GREEDY_CONTEXTS = ("red:", "the dog", "seven", "a cat ran", "x")


def _greedy_task(task_dir, name, model_dir, peft_dir=None):
    """A zero-shot loglikelihood task (metrics acc = is_greedy, perplexity) over continuations that
    are greedy for transformers' model of `model_dir` (+ the PEFT adapter), and near misses that are not."""
    from flacuna_jax.tokenizer import load_tokenizer

    ref = hf_reference(model_dir)
    if peft_dir is not None:
        from peft import PeftModel

        ref = PeftModel.from_pretrained(ref, str(peft_dir)).eval()
    rows = [{"context": c, "continuation": x} for c, x in greedy_requests(ref, load_tokenizer(model_dir), GREEDY_CONTEXTS)]
    assert len(rows) >= 6, "too few contexts whose greedy continuation is printable"
    data = _write_jsonl(task_dir / f"{name}.jsonl", rows)
    (task_dir / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: perplexity
""")
    return name, rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = np.random.default_rng(0)
    mc = [{"question": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))),
           "choices": [str(w) for w in rng.choice(WORDS, size=4, replace=False)], "label": int(rng.integers(4))}
          for _ in range(14)]
    gen = [{"prompt": f"{rng.choice(WORDS)}:", "answer": str(rng.choice(WORDS))} for _ in range(10)]  # one width: one compile
    ppl = [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 40))))} for _ in range(6)]
    files = {name: _write_jsonl(d / f"{name}.jsonl", rows) for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl))}
    (d / "flj_mc.yaml").write_text(f"""task: flj_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {files['mc']}
    test: {files['mc']}
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "flj_gen.yaml").write_text(f"""task: flj_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['gen']}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["#", "\\n", "M n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (d / "flj_ppl.yaml").write_text(f"""task: flj_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['ppl']}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return d


def _evaluate(model, model_args, task_dir, tasks, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0,
                                   log_samples=True, **kw)


@pytest.fixture(scope="module")
def our_lm(model_dir):
    from flacuna_jax.lm_eval import FlacunaLM

    return FlacunaLM(model=str(model_dir), batch_size=4)


@pytest.fixture(scope="module")
def both(model_dir, task_dir, our_lm):
    """(hf results, ours) on all four tasks, with 2-shot multiple choice."""
    tasks = ["flj_mc", "flj_gen", "flj_ppl", _greedy_task(task_dir, "flj_greedy", model_dir)[0]]
    fewshot = {"num_fewshot": 2}
    ref = _evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, task_dir, tasks, **fewshot)
    ours = _evaluate(our_lm, None, task_dir, tasks, **fewshot)
    return ref, ours


def _metric(results, task, name):
    return results["results"][task][f"{name},none"]


def _assert_loglikelihood_task_equal(ref, ours, task):
    """Every response (log-likelihood, is_greedy) and acc of a loglikelihood or multiple-choice task."""
    ref_resps = [[tuple(r[0]) for r in s["resps"]] for s in ref["samples"][task]]
    our_resps = [[tuple(r[0]) for r in s["resps"]] for s in ours["samples"][task]]
    np.testing.assert_allclose([[ll for ll, _ in x] for x in our_resps], [[ll for ll, _ in x] for x in ref_resps],
                               rtol=LOGLIK_RTOL)
    assert [[g for _, g in x] for x in our_resps] == [[g for _, g in x] for x in ref_resps]
    assert _metric(ours, task, "acc") == _metric(ref, task, "acc")
    return [[g for _, g in x] for x in ref_resps]


def test_multiple_choice_acc_identical_to_hf(both):
    ref, ours = both
    _assert_loglikelihood_task_equal(ref, ours, "flj_mc")
    assert _metric(ours, "flj_mc", "acc_norm") == _metric(ref, "flj_mc", "acc_norm")
    # few-shot contexts outgrow the 64-token window: left truncation is exercised
    assert max(len(s["arguments"][0][0]) for s in ours["samples"]["flj_mc"]) > WINDOW


def test_greedy_continuations_are_greedy_as_in_hf(both):
    """is_greedy (and lm-eval's acc, which is it) on continuations that are greedy for the model: a
    backend answering a constant is_greedy fails."""
    ref, ours = both
    greedy = _assert_loglikelihood_task_equal(ref, ours, "flj_greedy")
    assert [g for (g,) in greedy] == [True, False] * (len(greedy) // 2) and len(greedy) >= 6
    assert _metric(ours, "flj_greedy", "acc") == 0.5
    np.testing.assert_allclose(_metric(ours, "flj_greedy", "perplexity"), _metric(ref, "flj_greedy", "perplexity"),
                               rtol=LOGLIK_RTOL)


def test_generate_until_identical_to_hf(both):
    ref, ours = both
    assert _metric(ours, "flj_gen", "exact_match") == _metric(ref, "flj_gen", "exact_match")
    ref_text = [s["resps"][0][0] for s in ref["samples"]["flj_gen"]]
    our_text = [s["resps"][0][0] for s in ours["samples"]["flj_gen"]]
    assert our_text == ref_text
    # "#" and "\n" are one token each (our decoder stops on them), "M n" only appears in the text
    # (the tokenizer decodes M, n with a space between): texts were cut at each, others ran to max_gen_toks
    assert min(map(len, our_text)) < max(map(len, our_text))


def test_rolling_perplexity_matches_hf(both):
    ref, ours = both
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        np.testing.assert_allclose(_metric(ours, "flj_ppl", name), _metric(ref, "flj_ppl", name), rtol=LOGLIK_RTOL)
    ref_ll = [s["resps"][0][0] for s in ref["samples"]["flj_ppl"]]
    our_ll = [s["resps"][0][0] for s in ours["samples"]["flj_ppl"]]
    np.testing.assert_allclose(our_ll, ref_ll, rtol=LOGLIK_RTOL)
    assert max(len(s["arguments"][0][0]) for s in ours["samples"]["flj_ppl"]) > 2 * WINDOW  # several windows


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A PEFT adapter with random A and B (B != 0) on q_proj, v_proj and down_proj: it changes the answers."""
    from benchmarks.parity import random_factors
    from flacuna_jax import hf, peft_io
    from flacuna_jax.model import LoraSpec

    config = hf.load_hf_config(model_dir)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    factors = random_factors(config, spec, seed=3)
    out = peft_io.save_adapter(tmp_path_factory.mktemp("lm_eval_adapter") / "adapter", factors, spec, config.num_layers)
    return out, spec, factors


def _run_dir(path, spec, factors):
    """A training run's checkpoint holding `factors` (what `run=` folds into the base)."""
    from flacuna_jax import checkpoint, optim, train_state
    from flacuna_jax.config import Config, LoraConfig, OptimConfig, dump_config

    cfg = Config(output_dir=str(path), lora=LoraConfig(rank=spec.rank, alpha=spec.alpha, targets=spec.targets))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    tx, _ = optim.make_optimizer(OptimConfig(), 10)
    ck = checkpoint.Checkpointer(path)
    ck.save(2, train_state.init_train_state(factors, tx, 0), {})
    ck.close()
    return path


def _nf4_round_trip_dir(model_dir, out):
    """The model with each decoder projection replaced by bitsandbytes' NF4 quantize -> dequantize
    round trip in fp32 (blocks of 64, fp32 absmax): the weights an NF4 base computes with."""
    import shutil

    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, w in tensors.items():
        if any(f".{p}." in name for p in projections):
            packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
            tensors[name] = F.dequantize_4bit(packed, state).to(torch.float32).contiguous()
            assert not torch.equal(tensors[name], w)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


VARIANT_TASKS = {"num_fewshot": 1, "limit": 6}


@pytest.fixture(scope="module")
def peft_reference(model_dir, task_dir, adapter_dir):
    """`--model hf` with `peft=` the adapter: a greedy task made for that model, 1-shot multiple choice."""
    adapter, _, _ = adapter_dir
    greedy_task, rows = _greedy_task(task_dir, "flj_greedy_adapter", model_dir, peft_dir=adapter)
    from flacuna_jax.tokenizer import load_tokenizer

    base_rows = greedy_requests(hf_reference(model_dir), load_tokenizer(model_dir), GREEDY_CONTEXTS)
    assert [(r["context"], r["continuation"]) for r in rows] != base_rows  # the adapter changes the greedy answers
    ref = _evaluate("hf", {"pretrained": str(model_dir), "peft": str(adapter), "dtype": "float32", "device": "cpu"},
                    task_dir, [greedy_task, "flj_mc"], **VARIANT_TASKS)
    return greedy_task, ref


def _assert_variant_equal(ref, ours, greedy_task):
    greedy = _assert_loglikelihood_task_equal(ref, ours, greedy_task)
    assert [g for (g,) in greedy] == [True, False] * (len(greedy) // 2)
    _assert_loglikelihood_task_equal(ref, ours, "flj_mc")
    assert _metric(ours, "flj_mc", "acc_norm") == _metric(ref, "flj_mc", "acc_norm")


@pytest.mark.parametrize("variant", ["adapter", "run"])
def test_adapter_and_run_identical_to_hf_with_peft(variant, model_dir, task_dir, adapter_dir, peft_reference, tmp_path):
    """`adapter=` a PEFT dir, and `run=` a training checkpoint holding the same factors, against
    `--model hf` with `peft=` that adapter: every field of a greedy loglikelihood task (made for the
    adapted model: an adapter that was ignored fails it) and of 1-shot multiple choice. (Generation
    runs on the same folded parameters: `test_quantized_base_with_adapter_identical_to_hf_with_peft`.)"""
    from flacuna_jax.lm_eval import FlacunaLM

    adapter, spec, factors = adapter_dir
    greedy_task, ref = peft_reference
    args = {"adapter": str(adapter)} if variant == "adapter" else {"run": str(_run_dir(tmp_path / "run", spec, factors))}
    ours = _evaluate(FlacunaLM(model=str(model_dir), batch_size=4, **args), None, task_dir, [greedy_task, "flj_mc"],
                     **VARIANT_TASKS)
    _assert_variant_equal(ref, ours, greedy_task)


def test_quantized_base_with_adapter_identical_to_hf_with_peft(model_dir, task_dir, adapter_dir, tmp_path):
    """`base_quant=nf4` with `adapter=` (the factors on top of the NF4 base, not folded) against `--model
    hf` on bitsandbytes' NF4 quantize -> dequantize round trip of the same weights in fp32, `peft=` the
    adapter: every field of a greedy loglikelihood task, 1-shot multiple choice and generate_until."""
    from flacuna_jax.lm_eval import FlacunaLM

    adapter, _, _ = adapter_dir
    hf_dir = _nf4_round_trip_dir(model_dir, tmp_path / "nf4_round_trip")
    greedy_task, _ = _greedy_task(task_dir, "flj_greedy_nf4", hf_dir, peft_dir=adapter)
    tasks = [greedy_task, "flj_mc", "flj_gen"]
    ref = _evaluate("hf", {"pretrained": str(hf_dir), "peft": str(adapter), "dtype": "float32", "device": "cpu"},
                    task_dir, tasks, **VARIANT_TASKS)
    ours = _evaluate(FlacunaLM(model=str(model_dir), batch_size=4, adapter=str(adapter), base_quant="nf4"), None,
                     task_dir, tasks, **VARIANT_TASKS)
    _assert_variant_equal(ref, ours, greedy_task)
    assert [s["resps"][0][0] for s in ours["samples"]["flj_gen"]] == [s["resps"][0][0] for s in ref["samples"]["flj_gen"]]
    assert _metric(ours, "flj_gen", "exact_match") == _metric(ref, "flj_gen", "exact_match")


def test_sampling_is_seeded_and_honours_temperature_and_top_p(our_lm):
    """do_sample through lm-eval's generation kwargs: the same seed gives the same texts, another seed
    other texts; a top_p that keeps only the top token gives the greedy texts whatever the temperature.
    (That the draws follow transformers' temperature and top-p warpers: tests/test_generate.py.)
    flj_gen's stop strings, length and (2-shot) prompt width: the decoder `both` compiled is reused."""
    from lm_eval.api.instance import Instance

    def requests(**gen):
        return [Instance("generate_until", {}, (c, {"until": ["#", "\n", "M n"], "max_gen_toks": 12, **gen}), i)
                for i, c in enumerate(("red: blue\n\nthe dog: seven\n\nan old map: tea\n\nred:",
                                       "x: quiet night\n\nriver: green\n\nthe dog:", "tea: a cat\n\nseven: x\n\ntea:",
                                       "an old map: river\n\nblue: red\n\nquiet night:"))]

    hot = {"do_sample": True, "temperature": 3.0, "top_p": 0.95}
    seed = our_lm.seed
    try:
        our_lm.seed = 1
        first = our_lm.generate_until(requests(**hot))
        assert our_lm.generate_until(requests(**hot)) == first
        our_lm.seed = 2
        assert our_lm.generate_until(requests(**hot)) != first
    finally:
        our_lm.seed = seed
    greedy = our_lm.generate_until(requests(do_sample=False))
    assert our_lm.generate_until(requests(do_sample=True, temperature=3.0, top_p=1e-6)) == greedy != first


def test_cli_runs_lm_eval_with_our_model(model_dir, task_dir, tmp_path, local_tasks_only, both):
    """`python -m flacuna_jax.lm_eval` (in process): lm-eval's flags, `--model flacuna_jax` implied,
    results written, and the same acc / acc_norm as `--model hf` gave on the same settings."""
    from flacuna_jax.lm_eval import main

    main(["--model_args", f"model={model_dir},dtype=float32", "--tasks", "flj_mc", "--include_path", str(task_dir),
          "--num_fewshot", "2", "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    [path] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(path.read_text())
    assert results["config"]["model"] == "flacuna_jax"
    assert results["n-samples"]["flj_mc"]["effective"] == 14
    ref, _ = both
    for name in ("acc", "acc_norm"):
        assert results["results"]["flj_mc"][f"{name},none"] == _metric(ref, "flj_mc", name)


def test_registered_and_bad_arguments_are_refused(model_dir):
    from lm_eval.api.registry import get_model

    from flacuna_jax.lm_eval import FlacunaLM

    assert get_model("flacuna_jax") is FlacunaLM
    with pytest.raises(ValueError, match="adapter or run, not both"):
        FlacunaLM(model=str(model_dir), adapter="a", run="b")
    with pytest.raises(ValueError, match="batch_size=auto"):
        FlacunaLM(model=str(model_dir), batch_size="auto")


def test_base_quant_loads_the_quantized_base(model_dir):
    from flacuna_jax import quant
    from flacuna_jax.lm_eval import FlacunaLM

    lm = FlacunaLM(model=str(model_dir), base_quant="nf4")
    assert isinstance(lm.params["layers"]["attn"]["q_proj"]["kernel"], quant.NF4Weight)
    assert lm.get_model_info()["model_path"] == str(model_dir)
    with pytest.raises(ValueError, match="base_quant must be one of none, int8, nf4"):
        FlacunaLM(model=str(model_dir), base_quant="int4")


def test_generation_kwargs_we_cannot_honour_are_refused(model_dir):
    from flacuna_jax.lm_eval import FlacunaLM

    lm = FlacunaLM(model=str(model_dir), batch_size=2)
    with pytest.raises(ValueError, match=r"not supported by flacuna_jax: \['num_beams'\]"):
        lm._generate(["a:"], ["\n"], {"max_gen_toks": 4, "do_sample": False, "num_beams": 4})
    with pytest.raises(ValueError, match="needs temperature > 0"):
        lm._generate(["a:"], ["\n"], {"max_gen_toks": 4, "do_sample": True, "temperature": 0.0})
    with pytest.raises(ValueError, match=f"must be below the model's length \\({WINDOW}\\)"):
        lm._generate(["a:"], ["\n"], {"max_gen_toks": WINDOW, "do_sample": False})


def test_generation_eos_ids_follow_generation_config(tmp_path):
    from flacuna_jax.lm_eval import generation_eos_ids

    assert generation_eos_ids(tmp_path, 2) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert generation_eos_ids(tmp_path, 2) == (7, 9)


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's TaskManager without its thousands of built-in YAMLs (indexing them takes a minute here)."""
    import lm_eval.tasks

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


def test_training_eval_tasks_run_lm_eval_tasks(model_dir, task_dir, local_tasks_only):
    """`eval.tasks: [lm_eval:<task>]` in training: train.eval_suite scores the params it is given as the backend does."""
    from flacuna_jax import train
    from flacuna_jax.config import Config, ConfigError, EvalConfig, ModelConfig
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.lm_eval import FlacunaLM
    from flacuna_jax.tokenizer import load_tokenizer

    cfg = Config(model=ModelConfig(path=str(model_dir)),
                 eval=EvalConfig(tasks=("lm_eval:flj_mc",), lm_eval_include_path=str(task_dir), k=1, max_examples=6))
    model, params = load_for_inference(str(model_dir))
    metrics = train.eval_suite(cfg, model, load_tokenizer(model_dir))(params)
    expected = _evaluate(FlacunaLM(model=str(model_dir), batch_size=8), None, task_dir, ["flj_mc"], num_fewshot=1, limit=6)
    assert metrics == {"flj_mc/acc": _metric(expected, "flj_mc", "acc"), "flj_mc/acc_norm": _metric(expected, "flj_mc", "acc_norm")}
    bad = Config(model=cfg.model, eval=EvalConfig(tasks=("lm_eval:no_such_task",), lm_eval_include_path=str(task_dir)))
    with pytest.raises(ConfigError, match=r"eval.tasks.*unknown lm-eval task\(s\) \['no_such_task'\]"):
        train.eval_suite(bad, model, load_tokenizer(model_dir))


def test_stop_table_ends_a_row_once_it_ends_with_a_stop_sequence():
    """The automaton against the definition, on random token streams over a small alphabet."""
    from flacuna_jax.lm_eval import ends_with_any, stop_sequences_table

    stops = [[1, 2, 1], [2, 2], [3], [1, 2, 1, 1]]
    table = stop_sequences_table(stops, vocab_size=6)
    final = table.shape[1] - 1
    rng = np.random.default_rng(0)
    for _ in range(200):
        state, stream = 0, []
        for t in rng.integers(0, 5, size=12):
            stream.append(int(t))
            state = int(table[t, state])
            assert (state == final) == ends_with_any(stream, stops), stream
            if state == final:
                break
    assert stop_sequences_table([[]], 6) is None and stop_sequences_table([[9]], 6) is None
