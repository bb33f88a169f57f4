"""The `flacuna_jax` lm-eval backend against lm-eval's own HF backend (`--model hf`) on the same checkpoint.

Tasks are lm-eval YAMLs written here over local JSON files (nothing is downloaded): multiple choice
(acc, acc_norm), generate_until (exact_match, and every generated text) and a rolling-loglikelihood
perplexity task. The model is a decisive random LLaMA (tests.helpers.write_decisive_model) with a
window of 64 tokens, so few-shot contexts are left-truncated and documents span several windows.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from flacuna_jax import tiny
from tests.helpers import CHAR_VOCAB, write_decisive_model

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
def both(model_dir, task_dir):
    """(hf results, ours) on all three tasks, with 2-shot multiple choice."""
    from flacuna_jax.lm_eval import FlacunaLM

    tasks = ["flj_mc", "flj_gen", "flj_ppl"]
    fewshot = {"num_fewshot": 2}
    ref = _evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, task_dir, tasks, **fewshot)
    ours = _evaluate(FlacunaLM(model=str(model_dir), batch_size=4), None, task_dir, tasks, **fewshot)
    return ref, ours


def _metric(results, task, name):
    return results["results"][task][f"{name},none"]


def test_multiple_choice_acc_identical_to_hf(both):
    ref, ours = both
    for name in ("acc", "acc_norm"):
        assert _metric(ours, "flj_mc", name) == _metric(ref, "flj_mc", name)
    ref_ll = [[r[0][0] for r in s["resps"]] for s in ref["samples"]["flj_mc"]]
    our_ll = [[r[0][0] for r in s["resps"]] for s in ours["samples"]["flj_mc"]]
    np.testing.assert_allclose(our_ll, ref_ll, rtol=LOGLIK_RTOL)
    # few-shot contexts outgrow the 64-token window: left truncation is exercised
    assert max(len(s["arguments"][0][0]) for s in ours["samples"]["flj_mc"]) > WINDOW


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


def test_cli_runs_lm_eval_with_our_model(model_dir, task_dir, tmp_path, local_tasks_only):
    """`python -m flacuna_jax.lm_eval` (in process): lm-eval's flags, `--model flacuna_jax` implied, results written."""
    from flacuna_jax.lm_eval import main

    main(["--model_args", f"model={model_dir},dtype=float32", "--tasks", "flj_mc", "--include_path", str(task_dir),
          "--num_fewshot", "1", "--limit", "6", "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    [path] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(path.read_text())
    assert results["config"]["model"] == "flacuna_jax"
    assert results["n-samples"]["flj_mc"]["effective"] == 6
    assert 0.0 <= results["results"]["flj_mc"]["acc,none"] <= 1.0


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
