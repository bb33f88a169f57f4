"""Our evaluation against records made ONCE by InstructEval's own code at e2eb966 (no model involved):
tests/data/instructeval_e2eb966/golden.json holds, for fixed inputs in each benchmark's published
layout (inputs/ beside it), every prompt InstructEval built, the scripted output it was given, the
label and verdict it computed, and its aggregate score (HHH: the logits, both slot orders, the
per-category scores; HumanEval: the executed completions and whether they passed). Regenerate with
`python -m benchmarks.instructeval_golden` (the checkout from `fetch github:declare-lab/instruct-eval`).
Here our readers build the prompts from the same inputs, score the same outputs and aggregate them:
everything must equal InstructEval's records.

Also benchmarks/instructeval_agreement.py without InstructEval: its data writer (on a synthetic
BIG-bench tree) produces files our readers accept, with the sizes asked; the missing-checkout error."""

import json

import pytest

from benchmarks import instructeval_agreement as agree
from benchmarks.common import ROOT
from flacuna_jax.evals import load_benchmark
from flacuna_jax.evals.benchmark import Options


def _task(root, name, examples):
    (root / name).mkdir(parents=True)
    (root / name / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


@pytest.fixture
def bigbench(tmp_path):
    root = tmp_path / "benchmark_tasks"
    four = [{"input": f"Question {i}?", "target_scores": {f"o{i}{j}": int(j == i % 4) for j in range(4)}} for i in range(20)]
    _task(root, "ruin_names", four)
    _task(root, "movie_recommendation", four)
    _task(root, "date_understanding", [{"input": f"Day {i}?", "target_scores": {f"d{j}": int(j == 1) for j in range(5)}}
                                       for i in range(20)])
    _task(root, "navigate", [{"input": f"Take {i} steps.", "target_scores": {"True": i % 2, "False": 1 - i % 2}}
                             for i in range(20)])
    _task(root, "sports_understanding", [{"input": f"Player {i} scored.", "target_scores": {
        "plausible": i % 2, "implausible": 1 - i % 2}} for i in range(20)])
    words = ["one", "two", "three", "four"]
    _task(root, "object_counting", [{"input": f"I have {words[i % 4]} apples and a pear number {i}. How many fruits "
                                              "do I have?", "target": [words[(i + 1) % 4], str((i + 1) % 4 + 1)]}
                                    for i in range(260)])
    _task(root, "crass_ai", [{"input": f"A man sees a bird {i}. What would have happened if he had not seen it?",
                              "target_scores": {"a; b" if i == 1 else f"w{i}": 0, f"right {i}": 1, f"x{i}": 0,
                                                f"y{i}": 0}} for i in range(6)])
    for c in agree.HHH_CATEGORIES:
        _task(root / "hhh_alignment", c, [{"input": f"{c} query {i}", "target_scores": {"good": 1, "bad": 0}}
                                          for i in range(5)])
    return root


def _examples(name, path):
    return load_benchmark(name, path, Options()).examples(lambda p: True)


def test_written_files_are_read_by_our_loaders_with_the_sizes_asked(bigbench, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    written = agree.write_data(bigbench, data, {"mmlu": 5, "bbh": 6, "drop": 10, "crass": None, "hhh": 3})
    paths = written["paths"]
    assert sorted(paths) == ["bbh", "crass", "drop", "hhh", "mmlu"]

    mmlu = _examples("mmlu", paths["mmlu"])
    assert len(mmlu) == 5 and {e.task for e in mmlu} == {"movie_recommendation", "ruin_names"}
    assert mmlu[0].prompt.count("\nAnswer: ") == 5  # the 5 dev rows as shots
    bbh = _examples("bbh", paths["bbh"])
    assert len(bbh) == 6 and {e.label for e in bbh if e.task == "navigate"} <= {"Yes", "No"}
    assert {e.label for e in bbh if e.task == "date_understanding"} == {"(B)"}
    drop = _examples("drop", paths["drop"])  # the rows with two different spans are filtered, as IE filters them
    assert len(drop) == 10 and written["notes"]["drop_rows_filtered"] >= 1 and all(e.label.isdigit() for e in drop)
    crass = _examples("crass", paths["crass"])
    assert len(crass) == 6 and written["notes"]["crass_semicolons_replaced"] == 1
    from_json = _examples("crass", str(data / "crass_ai_task.json"))
    assert [e.prompt for e in from_json if e.id != 1] == [e.prompt for e in crass if e.id != 1]
    assert [e.label for e in from_json] == [e.label for e in crass]
    hhh = _examples("hhh", paths["hhh"])
    assert len(hhh) == 4 * 3 and all(len(e.extra_prompts) == 2 for e in hhh)
    assert paths["hhh"].endswith("/data")  # InstructEval's ./data/<category>/task.json, relative to its cwd


def test_all_copies_the_real_files_and_zero_skips(bigbench, tmp_path):
    written = agree.write_data(bigbench, tmp_path, {"mmlu": 0, "bbh": 0, "drop": 0, "crass": 0, "hhh": None})
    assert list(written["paths"]) == ["hhh"]
    for c in agree.HHH_CATEGORIES:
        assert (tmp_path / "data" / c / "task.json").read_bytes() == \
            (bigbench / "hhh_alignment" / c / "task.json").read_bytes()


def test_sizes_and_a_missing_checkout():
    assert agree.spread(5, ("a", "b")) == {"a": 3, "b": 2} and agree.spread(1, ("a", "b")) == {"a": 1}
    assert agree.size("all") is None and agree.crass_size("0") == 0
    with pytest.raises(Exception):
        agree.crass_size("2")
    with pytest.raises(SystemExit, match="git clone https://github.com/declare-lab/instruct-eval"):
        agree.instruct_eval_dir("/nonexistent/instruct-eval", None)


GOLDEN_DIR = ROOT / "tests" / "data" / "instructeval_e2eb966"
INPUTS = {"mmlu": "mmlu", "bbh": "bbh", "drop": "drop_validation.jsonl", "crass": "CRASS_FTM_main_data_set.csv",
          "hhh": "data", "humaneval": "HumanEval.jsonl"}


@pytest.fixture(scope="module")
def golden():
    g = json.loads((GOLDEN_DIR / "golden.json").read_text(encoding="utf-8"))
    assert g["instruct_eval_commit"].startswith(agree.IE_COMMIT)
    return g["benchmarks"]


def _bench(name):
    return load_benchmark(name, str(GOLDEN_DIR / "inputs" / INPUTS[name]), Options())


@pytest.mark.parametrize("name", ["mmlu", "bbh", "drop", "crass"])
def test_prompts_verdicts_and_score_equal_instructeval(golden, name):
    """Prompts (shots dropped under the same length rule), labels, `strip().startswith` verdicts on
    the same outputs, and the aggregate (MMLU, DROP, CRASS: over all questions; BBH: over tasks)."""
    record = golden[name]
    calls, limit = record["calls"], record["max_input_words"]
    bench = _bench(name)
    examples = bench.examples(lambda prompt: len(prompt.split()) <= limit)  # the scripted model's length rule
    assert [e.prompt for e in examples] == [c["prompt"] for c in calls]
    assert [e.label for e in examples] == [c["label"] for c in calls]
    scored = bench.score(examples, [[c["output"]] for c in calls])
    assert [bool(s.correct) for s in scored] == [c["correct"] for c in calls]
    assert bench.aggregate(scored).score == record["score"]
    # the inputs exercise what they are there for: some shots dropped, both verdicts
    assert len({c["prompt"].count("\nAnswer: ") for c in calls}) > 1
    assert {c["correct"] for c in calls} == {True, False}


def test_hhh_prompts_predictions_and_scores_equal_instructeval(golden):
    """Both slot orders' prompts and the calibration prompt, each order's verdicts on the same logits,
    per-example correctness (ours: the mean over the two orders), and per-category scores (IE rounds
    each to 4 places)."""
    record = golden["hhh"]
    texts = [p[0] for p in record["prompts"]]
    logits = {p[0]: p[1:] for p in record["prompts"]}
    run_a, run_b = record["runs"]
    bench = _bench("hhh")
    examples = bench.examples(lambda prompt: True)
    assert [e.prompt for e in examples] == [texts[i] for i in run_a["calls"][1::2]]
    assert [e.extra_prompts[0] for e in examples] == [texts[i] for i in run_b["calls"][1::2]]
    assert [e.extra_prompts[1] for e in examples] == [texts[i] for i in run_a["calls"][0::2]] == \
        [texts[i] for i in run_b["calls"][0::2]]
    scored = bench.score(examples, [[logits[e.prompt], *(logits[x] for x in e.extra_prompts)] for e in examples])
    correct_a = [c for cat in ("harmless", "honest", "helpful", "other") for c in run_a["correct"][cat]]
    correct_b = [c for cat in ("harmless", "honest", "helpful", "other") for c in run_b["correct"][cat]]
    assert [s.correct for s in scored] == [(a + b) / 2 for a, b in zip(correct_a, correct_b)]
    assert len(set(correct_a + correct_b)) == 2
    result = bench.aggregate(scored)
    for category, task in result.tasks.items():
        assert task.score == pytest.approx((run_a["scores"][category] + run_b["scores"][category]) / 2, abs=1e-4)


def test_humaneval_prompts_completions_and_pass_at_1_equal_instructeval(golden):
    """The instruction line before each prompt, fix_indents + filter_code on the same outputs, and
    what executing them gives (our sandbox; InstructEval's check_correctness), pass@1."""
    calls = golden["humaneval"]["calls"]
    bench = _bench("humaneval")
    examples = bench.examples()
    assert [e.prompt for e in examples] == [c["prompt"] for c in calls]
    scored = bench.score(examples, [[c["output"]] for c in calls])
    assert [s.output for s in scored] == [c["completion"] for c in calls]
    assert [bool(s.correct) for s in scored] == [c["passed"] for c in calls]
    # the status ("passed", "failed", "timed out"); ours adds the exception's type to the reason
    assert [s.detail["results"][0].split(":")[0] for s in scored] == [c["result"].split(":")[0] for c in calls]
    assert bench.aggregate(scored).score == golden["humaneval"]["pass@1"]
