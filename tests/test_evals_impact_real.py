"""IMPACT on the real SmolLM2-135M-Instruct (`make test-real`; minutes on 2 CPU cores):

- the answers our batched decoder writes equal InstructEval's LLaMA class (transformers `generate` with
  max_new_tokens=1024 and nothing else, one prompt at a time, the new tokens decoded), judged by the stub;
- SmolLM2 as both the model under test and the judge, the judge a real OpenAI-compatible server started
  by `benchmarks/judge_server.py` (FLACUNA_JUDGE_SERVER: our `python -m flacuna_jax.serve` by default,
  "transformers" for `transformers serve`, or a command template).
"""

import json

import pytest
import torch

from benchmarks.judge_server import JudgeServer
from benchmarks.judge_stub import StubJudge
from flacuna_jax.evals.impact_rubrics import judge_prompt
from tests.helpers import hf_reference

pytestmark = pytest.mark.real

RECORDS = [
    {"Category": "informative", "Definition": "You are tasked to demonstrate your writing skills in informative "
     "writing for the following question.", "Prompt": "In two sentences, why do leaves change colour in autumn?"},
    {"Category": "creative", "Definition": "You are tasked to demonstrate your writing skills in creative writing "
     "for the following question.", "Prompt": "Write a four-line poem about a lighthouse."},
]


def run_impact(model_dir, tmp_path, judge_url, judge_model, *extra):
    from flacuna_jax.eval import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    main(["--model", str(model_dir), "--benchmark", f"impact={data}", "--judge-url", judge_url,
          "--judge-model", judge_model, "--batch-size", "2", "--out", str(tmp_path / "results.json"),
          "--predictions", str(tmp_path / "preds.jsonl"), *extra])
    return ([json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()],
            json.loads((tmp_path / "results.json").read_text())["benchmarks"]["impact"])


def test_answers_equal_instructevals_llama_class(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    with StubJudge(lambda p, n: "3") as stub:
        preds, impact = run_impact(smollm2_dir, tmp_path, stub.base_url, "stub-judge")
    ref, tok = hf_reference(smollm2_dir), AutoTokenizer.from_pretrained(str(smollm2_dir))
    for pred, rec in zip(preds, RECORDS):
        prompt = rec["Definition"] + " " + rec["Prompt"]
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=1024)  # LlamaModel.run passes nothing else
        assert pred["prompt"] == prompt
        assert pred["output"] == tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert sorted(stub.prompts()) == sorted(judge_prompt(m, p["output"], r["Prompt"])
                                            for p, r in zip(preds, RECORDS) for m in ("relevance", "coherence"))
    assert impact["relevance"] == impact["coherence"] == 3.0


def test_smollm2_judges_its_own_answers_through_a_real_server(smollm2_dir, tmp_path):
    with JudgeServer.from_env(str(smollm2_dir)) as server:
        preds, impact = run_impact(smollm2_dir, tmp_path, server.base_url, server.model_name,
                                   "--judge-max-tokens", "32", "--judge-concurrency", "4",
                                   "--judge-timeout", "900")  # a CPU server under load can take minutes a reply
    for p in preds:
        for mode in ("relevance", "coherence"):
            assert isinstance(p[f"{mode}_review"], str) and p[f"{mode}_review"]  # a real reply, kept raw
            assert 1 <= p[mode] <= 5
    assert 1 <= impact["relevance"] <= 5 and 1 <= impact["coherence"] <= 5
    assert impact["judge"]["model"] == server.model_name
    cache = [json.loads(line) for line in (tmp_path / "judge_cache.jsonl").read_text().splitlines()]
    assert len(cache) == 4 and {c["judge_model"] for c in cache} == {server.model_name}
