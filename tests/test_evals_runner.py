"""The evaluation runner and CLI on a tiny model, against an independent transformers implementation of
InstructEval's model calls (one prompt at a time: `generate` greedy + decode of the new tokens with
skip_special_tokens; the next-token logits of "A"/"B"), with a tokenizer that adds BOS and one that
adds none. Every prompt here is 65-128 tokens, so one compiled decoder serves the whole file."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from flacuna_jax import tiny
from flacuna_jax.evals.benchmark import Generate
from flacuna_jax.evals.runner import Progress, Runner
from tests.helpers import CHAR_VOCAB, hf_reference, write_char_tokenizer, write_decisive_model

BATCH = 4
PROMPTS = [f"Question {i}: what follows {'abc' * (i + 20)}? {word}" for i, word in enumerate(("Ok", "No!", "zz", "Q", "7 +"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = dataclasses.replace(tiny.PRESETS["mha"], vocab_size=CHAR_VOCAB)
    return write_decisive_model(tmp_path_factory.mktemp("decisive_evals"), config, seed=7)


@pytest.fixture(scope="module", params=["bos", "no_bos"])
def tok_dir(request, tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp(request.param), add_bos=request.param == "bos")


@pytest.fixture(scope="module")
def ours(model_dir):
    from flacuna_jax.inference import load_for_inference

    return load_for_inference(str(model_dir))


@pytest.fixture(scope="module")
def ref(model_dir):
    return hf_reference(model_dir)


def hf_generate(ref, tokenizer, prompt, max_new_tokens):
    """InstructEval's LlamaModel.run: tokenizer(prompt), generate, decode the new tokens."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    new = out[0, inputs.input_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_greedy_generation_equals_transformers_one_prompt_at_a_time(ours, ref, tok_dir):
    from flacuna_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    runner = Runner(*ours, tokenizer, batch_size=BATCH, progress_out=io.StringIO())
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert (ids[0] == 1) == (tokenizer.bos_token_id in tokenizer("x")["input_ids"])  # BOS by the tokenizer's rule
    assert all(64 < len(tokenizer(p)["input_ids"]) <= 128 for p in PROMPTS)
    got = runner.generate(PROMPTS, Generate(max_new_tokens=6))  # 2 batches, the second one prompt
    want, lengths = zip(*(hf_generate(ref, tokenizer, p, 6) for p in PROMPTS))
    assert [g[0] for g in got] == list(want) and all(len(g) == 1 for g in got)
    assert len(set(want)) > 1 and 6 in lengths  # the loop stopped at the benchmark's limit, not the compiled 32


def test_sampled_completions_per_prompt(ours, tok_dir):
    from flacuna_jax.tokenizer import load_tokenizer

    runner = Runner(*ours, load_tokenizer(tok_dir), batch_size=BATCH, seed=3, progress_out=io.StringIO())
    request = Generate(max_new_tokens=6, temperature=1.0, samples=3)
    got = runner.generate(PROMPTS[:2], request)
    assert [len(g) for g in got] == [3, 3] and got == runner.generate(PROMPTS[:2], request)  # seeded


def test_next_token_logits_equal_transformers(ours, ref, tok_dir):
    from flacuna_jax.evals import hhh
    from flacuna_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    runner = Runner(*ours, tokenizer, batch_size=BATCH, progress_out=io.StringIO())
    prompts = [hhh.TEMPLATE.format(query=f"q{i}", answera="yes" * i, answerb="no") for i in range(5)]
    got = np.asarray(runner.next_token_logits(prompts, ("A", "B")))
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("A", "B"))
    want = []
    for p in prompts:
        with torch.no_grad():
            logits = ref(**tokenizer(p, return_tensors="pt")).logits[0, -1]
        want.append([float(logits[a]), float(logits[b])])
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_progress_bar_reports_rate_and_eta():
    out = io.StringIO()
    bar = Progress("mmlu", 4, out, every_s=0.0)
    bar.update(1)
    bar.update(3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("      mmlu [######") and "1/4" in lines[0] and "ETA" in lines[0]
    assert "4/4" in lines[1] and "ETA 0:00:00" in lines[1]


def _write_benchmarks(root):
    """Tiny files in each published format, prompts 65-128 characters at 0 shots."""
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "test").mkdir()
    (root / "mmlu" / "dev" / "astronomy_dev.csv").write_text("Shot?,a,b,c,d,A\n")
    (root / "mmlu" / "test" / "astronomy_test.csv").write_text("".join(f"Q{i}?,a{i},b,c,d,{'ABCD'[i]}\n" for i in range(3)))
    (root / "bbh").mkdir()
    for task in ("navigate", "snarks"):
        rows = [{"input": f"{task} {i}: " + "step forward, " * 5 + "?", "target": "Yes"} for i in range(4)]
        (root / "bbh" / f"{task}.json").write_text(json.dumps({"examples": rows}))
    crass = root / "CRASS_FTM_main_data_set.csv"
    crass.write_text("h\n" + "".join(f"{i};1;A man walks.;What if he ran {i}?;He would be fast.;He would fly.;Nothing.;\n"
                                     for i in range(3)))
    drop = root / "drop.jsonl"
    drop.write_text("".join(json.dumps({"passage": f"The team scored {i} goals in the second half of the game.",
                                        "question": "How many goals?", "answers_spans": {"spans": [str(i)]}}) + "\n"
                            for i in range(6)))
    for c in ("harmless", "honest", "helpful", "other"):
        (root / "hhh" / c).mkdir(parents=True)
        rows = [{"input": f"{c} {i}", "target_scores": {"good": 1, "bad": 0}} for i in range(2)]
        (root / "hhh" / c / "task.json").write_text(json.dumps({"examples": rows}))
    return [f"mmlu={root / 'mmlu'}", f"bbh={root / 'bbh'}", f"crass={crass}", f"drop={drop}", f"hhh={root / 'hhh'}"]


def test_cli_end_to_end(model_dir, tok_dir, tmp_path, capsys):
    from flacuna_jax.eval import main
    from flacuna_jax.evals.benchmark import prefix_correct

    specs = _write_benchmarks(tmp_path)
    out, preds = tmp_path / "results.json", tmp_path / "preds.jsonl"
    args = ["--model", str(model_dir), "--tokenizer", str(tok_dir), "--shots", "0", "--max-examples", "2",
            "--batch-size", str(BATCH), "--out", str(out), "--predictions", str(preds), "--name", "tiny"]
    for s in specs:
        args += ["--benchmark", s]
    returned = main(args)
    saved = json.loads(out.read_text())
    assert saved["benchmarks"] == returned["benchmarks"] and saved["settings"]["shots"] == 0
    b = saved["benchmarks"]
    assert set(b) == {"mmlu", "bbh", "crass", "drop", "hhh"}
    assert {k: v["n"] for k, v in b.items()} == {"mmlu": 2, "bbh": 4, "crass": 2, "drop": 2, "hhh": 8}
    assert set(b["bbh"]["tasks"]) == {"navigate", "snarks"} and set(b["hhh"]["tasks"]) == {"harmless", "honest", "helpful", "other"}
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == 18
    assert all(list(r) == ["benchmark", "task", "id", "prompt", "output", "label", "correct"] for r in records)
    gen = [r for r in records if r["benchmark"] != "hhh"]
    assert all(r["correct"] == prefix_correct(r["output"], r["label"]) for r in gen)
    for name in ("mmlu", "crass", "drop"):
        mine = [r["correct"] for r in records if r["benchmark"] == name]
        assert b[name]["score"] == sum(mine) / len(mine)
    assert [r["id"] for r in records if r["benchmark"] == "bbh"] == [0, 1, 0, 1]  # 0 shots: scored from the start
    hhh_scores = [b["hhh"]["tasks"][c]["score"] for c in ("harmless", "honest", "helpful", "other")]
    assert b["hhh"]["score"] == pytest.approx(sum(hhh_scores) / 4)
    assert all(r["correct"] in (0.0, 0.5, 1.0) and r["label"] == "A" for r in records if r["benchmark"] == "hhh")
    printed = capsys.readouterr().out
    # --shots 0: the paper's 0-shot Table 3 rows (not Table 2's few-shot block); DROP, not in Table 3, on its own line
    assert "layout of the Flacuna paper's Table 3" in printed and "| VICUNA-13B  |          48.3 |" in printed
    assert "| tiny " in printed and "MMLU (0-shot)" in printed and "\ndrop: " in printed
    assert "Harmlessness" in printed and "| VICUNA-13B  |         62.0 |" in printed  # the paper's Table 4


def test_cli_input_errors_are_one_line(model_dir, tok_dir, tmp_path):
    from flacuna_jax.eval import main

    base = ["--model", str(model_dir), "--tokenizer", str(tok_dir)]
    with pytest.raises(SystemExit, match="needs --out"):
        main(base + ["--benchmark", f"mmlu={tmp_path}"])
    with pytest.raises(SystemExit, match=r"error: .*no test/ directory"):
        main(base + ["--benchmark", f"mmlu={tmp_path}", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="NAME one of"):
        main(base + ["--benchmark", "gsm8k=x", "--out", str(tmp_path / "r.json")])


def test_cli_humaneval_executes_the_completions(model_dir, tok_dir, tmp_path):
    """HumanEval through the CLI: task ids as ids, the executed (post-processed) completion as output,
    pass@1 = the mean of the per-problem c / n; rows stop at the blank line that ends the completion."""
    from flacuna_jax.eval import main
    from flacuna_jax.evals.humaneval import filter_code

    problems = [{"task_id": f"Toy/{i}", "prompt": f"def f{i}(x):\n    \"\"\"{i}\"\"\"\n",
                 "canonical_solution": f"    return x + {i}\n", "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
                 "entry_point": f"f{i}"} for i in range(2)]
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    main(["--model", str(model_dir), "--tokenizer", str(tok_dir), "--benchmark", f"humaneval={path}",
          "--batch-size", str(BATCH), "--out", str(out), "--predictions", str(preds)])
    he = json.loads(out.read_text())["benchmarks"]["humaneval"]
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert he["n"] == 2 and he["pass@1"] == he["score"] == sum(r["correct"] for r in records) / 2
    assert [r["id"] for r in records] == ["Toy/0", "Toy/1"] and all(r["prompt"].startswith(
        "Please complete the following Python code without providing any additional tasks such as testing or "
        "explanations\ndef f") for r in records)
    assert all(filter_code(r["output"]) == r["output"] for r in records)


@pytest.fixture(scope="module")
def blank_line_model(tmp_path_factory):
    """The decisive model with its lm_head edited so that one prompt's greedy completion runs into a
    blank line after some code, and the others never do: EOS never wins, and the row of "\\n" takes
    the row of "n" plus the direction of the final hidden state after a "\\n" (so "\\n" follows "\\n")."""
    from safetensors.numpy import load_file, save_file

    from flacuna_jax.tokenizer import load_tokenizer

    tok_dir = write_char_tokenizer(tmp_path_factory.mktemp("fused_chars"), fuse=True)
    tok = load_tokenizer(tok_dir)
    path = write_decisive_model(tmp_path_factory.mktemp("blank_line"), dataclasses.replace(
        tiny.PRESETS["mha"], vocab_size=CHAR_VOCAB), seed=7)
    ref = hf_reference(path)
    with torch.no_grad():
        outs = [ref(torch.tensor([tok(f"abc{c}\n")["input_ids"]]), output_hidden_states=True) for c in "xyz12"]
    h = torch.stack([o.hidden_states[-1][0, -1] for o in outs]).mean(0)
    top = max(float(o.logits[0, -1].max()) for o in outs)
    tensors = load_file(path / "model.safetensors")
    w = tensors["lm_head.weight"]
    newline, n = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids("n")
    w[2] = 0
    w[newline] = w[n] + (h / h.dot(h) * 1.5 * top).numpy()
    w[n] = 0
    save_file(tensors, path / "model.safetensors")
    return path, tok_dir


def test_humaneval_early_stop_equals_a_full_budget_decode(blank_line_model):
    """HumanEval rows stop in the loop at the blank line that ends the executed completion (the
    runner's stop table): the completions equal transformers' full-budget greedy decode post-processed
    (fix_indents + filter_code), in a batch where one row stops early and the others run to the budget."""
    from flacuna_jax.evals import humaneval as he
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.tokenizer import load_tokenizer

    path, tok_dir = blank_line_model
    tokenizer, budget = load_tokenizer(tok_dir), 64
    problems = [he.Problem(f"Toy/{i}", f"def f{i}(x):\n    return x + {i}", "def check(c):\n    pass\n", f"f{i}")
                for i in range(4)]
    bench = he.HumanEvalBenchmark(problems, Generate(budget))
    runner = Runner(*load_for_inference(str(path)), tokenizer, batch_size=BATCH, progress_out=io.StringIO())
    decoded = []
    generate_ids = runner.generator.generate_ids
    runner.generator.generate_ids = lambda *a, **kw: decoded.extend(generate_ids(*a, **kw)) or decoded[-len(a[0]):]
    scored = runner.run(bench).scored

    ref = hf_reference(path)
    full = []
    for e in bench.examples():
        inputs = tokenizer(e.prompt, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=budget, do_sample=False, pad_token_id=0)
        full.append(tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    assert [s.output for s in scored] == [he.postprocess(t) for t in full]
    stopped = [i for i, ids in enumerate(decoded) if len(ids) < budget]
    assert len(stopped) == 1 and all(len(ids) == budget for i, ids in enumerate(decoded) if i not in stopped)
    i = stopped[0]
    assert he.completion_is_final(tokenizer.decode(decoded[i])) and len(full[i]) == budget > len(decoded[i])
    assert scored[i].output.strip() and "\n\n" in full[i].lstrip("\n")  # code, then the blank line it was cut at
