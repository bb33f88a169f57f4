"""IMPACT, the writing evaluation (flacuna_jax/evals/impact.py): the judge prompts byte for byte as
InstructEval's `template.format(...)` builds them (written out here), its score rule on crafted replies,
the reader in every published layout and its errors, the paper's Table 5 (and Tables 2-4) rows, and the
CLI end to end on a tiny model with a scripted OpenAI-compatible judge on loopback: answers, reviews,
per-category means, a judge that fails (one-line error, the cache keeps what was judged, the rerun
asks only for the rest) and a dead judge (stopped before generation). ~40 s on 2 CPU cores.

The records are in the published data.jsonl's schema ({"Category", "Definition", "Prompt"}); their
texts are ours (the dataset is not reachable offline)."""

import dataclasses
import hashlib
import json

import pytest

from benchmarks.judge_stub import Scripted, StubJudge, free_port
from flacuna_jax import tiny
from flacuna_jax.evals.benchmark import BenchmarkInputError, Options
from flacuna_jax.evals.impact import generation_prompt, load, read_records, review_score
from flacuna_jax.evals.impact_rubrics import COHERENCE, RELEVANCE, judge_prompt
from tests.helpers import CHAR_VOCAB, write_char_tokenizer, write_decisive_model

CATEGORIES = ("informative", "professional", "argumentative", "creative")
RECORDS = [
    {"Category": c, "Definition": f"You are tasked to demonstrate your writing skills in {c} writing for the following question.",
     "Prompt": f"Write a short {c} text about rivers, number {i}."}
    for i, c in enumerate(CATEGORIES)
]

# InstructEval's two prompts for Answer "The {answer} text." and Prompt "Say 100% of it, {twice}?" (braces
# in the filled values stay as they are: only the template is a format string).
EXPECTED_RELEVANCE = (
    "Text: The {answer} text.\n"
    "        \n"
    "        Prompt: Say 100% of it, {twice}?\n"
    "        \n"
    "        How relevant is the text to the prompt? Select a suitable option number between 1 and 5 based on the options below.\n"
    "\n"
    "        1. Inadequate: The text fails to provide any relevant information or insights related to the given prompt.\n"
    "        2. Limited: The text may contain some relevant information, but significant gaps exist, and key aspects of the prompt are not adequately covered.\n"
    "        3. Satisfactory: The text covers the main aspects of the prompt and provides relevant information, but it lacks depth and may not explore the topic in great detail.\n"
    "        4. Proficient: The text provides a comprehensive response by addressing the key aspects of the prompt, offering relevant and well-supported information or arguments. \n"
    "        5. Excellent: The text thoroughly and thoughtfully addresses the prompt, demonstrating a comprehensive understanding of the topic. It offers insightful and original ideas, supported by relevant arguments and information.\n"
    "        "
)
EXPECTED_COHERENCE = (
    "Text: The {answer} text.\n"
    "        \n"
    "        How coherent is the text? Select a suitable option number between 1 and 5 based on the options below.\n"
    "\n"
    "        1. Inadequate: The text lacks logical organization, making it difficult to follow. Ideas are disjointed and phrased awkwardly, requiring significant effort to understand.\n"
    "        2. Limited: The text demonstrates some attempt at organization, but there are significant gaps in coherence. Ideas may be loosely connected, and the arguments lack clarity.\n"
    "        3. Satisfactory: The text generally follows a logical organization, but occasional disruptions or awkward phrasing may occur. There is an acceptable level of readability and understanding.\n"
    "        4. Proficient: The text is clearly organized and easy to understand. Ideas and arguments flow smoothly, contributing to easy comprehension and a pleasant reading experience.\n"
    "        5. Excellent: The text presents exceptionally coherent writing with a fluent and engaging flow of ideas, ensuring effortless comprehension and a delightful reading experience.\n"
    "        "
)


def test_judge_prompts_are_instructevals_byte_for_byte():
    answer, prompt = "The {answer} text.", "Say 100% of it, {twice}?"
    assert judge_prompt("relevance", answer, prompt) == EXPECTED_RELEVANCE
    assert judge_prompt("coherence", answer, prompt) == EXPECTED_COHERENCE
    # the templates' sha256, computed from subjective.py at e2eb966 (the module docstring)
    assert hashlib.sha256(RELEVANCE.encode()).hexdigest() == "e5980ef1980cf9e43ce6116283ef40d65b71576cb5b1868646e96b768fe67710"
    assert hashlib.sha256(COHERENCE.encode()).hexdigest() == "00b8b34b5c3a4c29ac5ea768233cd42a54a49f50ceb68ad870f75576ef3369ad"


def instructeval_loop(review: str) -> int:
    """score_answers' loop, as a test oracle: Score starts at 0 (samples.jsonl's default), each digit
    character overwrites it, then anything outside 1..5 becomes 1."""
    score = 0
    for char in review:
        if char.isdigit():
            score = int(char)
    return score if 1 <= score <= 5 else 1


@pytest.mark.parametrize("review, expected", [
    ("4", 4),                                             # a lone digit
    ("4/5", 5),                                           # the last digit wins, not the first
    ("10", 1),                                            # ends in 0: out of range -> 1
    ("The text is well written.", 1),                     # no digit -> 1
    ("I would rate this text a 3 overall.", 3),           # a digit inside a sentence
    ("Option 2. Limited: gaps exist.", 2),
    ("Score: 4 (Proficient) out of 5", 5),
    ("I choose 3, since 7 aspects are covered", 1),       # last digit 7: out of range -> 1
    ("", 1),
    ("The response was filtered", 1),                     # InstructEval's text for a filtered reply
    ("Rating: \uff14", 4),                                # a full-width digit: isdigit() and int() agree
])
def test_score_rule_equals_instructevals(review, expected):
    assert review_score(review) == expected == instructeval_loop(review)


def test_score_rule_skips_a_digit_int_rejects_where_instructeval_raises():
    with pytest.raises(ValueError):
        instructeval_loop("3²")
    assert review_score("3²") == 3


def test_generation_prompts():
    rec = RECORDS[1]
    assert generation_prompt(rec) == rec["Definition"] + " " + rec["Prompt"]
    assert generation_prompt(rec, "flacuna") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: " + rec["Definition"] + "\n\n" + rec["Prompt"]
        + "\nOutput: ASSISTANT:")
    with pytest.raises(BenchmarkInputError, match="unknown IMPACT prompt style"):
        generation_prompt(rec, "alpaca")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reader_reads_every_published_layout_alike(tmp_path):
    import datasets
    import pandas as pd

    extra = [dict(r, Answer="old", Score=3) for r in RECORDS]  # a previous run's fields are ignored
    jsonl = write_jsonl(tmp_path / "data.jsonl", extra)
    pd.DataFrame(RECORDS).to_csv(tmp_path / "data.csv", index=False)
    pd.DataFrame(RECORDS).to_parquet(tmp_path / "data.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "hub"))
    for path in (jsonl, tmp_path / "data.csv", tmp_path / "data.parquet", tmp_path / "hub"):
        assert read_records(path) == RECORDS, path


def test_max_examples_keeps_the_first_n_of_each_category(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS + RECORDS)
    bench = load(str(path), Options(max_examples=1), judge=object())
    assert [(e.task, e.id) for e in bench.examples(lambda p: True)] == [(c, i) for i, c in enumerate(CATEGORIES)]
    assert len(load(str(path), Options(), judge=object()).examples(lambda p: True)) == 8


@pytest.mark.parametrize("content, msg", [
    ('{"Category": "creative", "Definition": "d"}\n', r"data.jsonl:1: 'Prompt' missing or not text"),
    ('{"Category": "c", "Definition": "d", "Prompt": "p"}\n{"Category": 3, "Definition": "d", "Prompt": "p"}\n',
     r"data.jsonl:2: 'Category' missing or not text"),
    ('{"Category": "c", "Definition": "d", "Prompt": "p"}\nnot json\n', r"data.jsonl:2: invalid JSON"),
    ('{"Category": "c", "Definition": "d", "Prompt": "  "}\n', r"data.jsonl:1: 'Prompt' is empty"),
    ("\n", r"data.jsonl: no IMPACT records"),
])
def test_malformed_data_is_a_one_line_error_naming_file_and_record(tmp_path, content, msg):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(BenchmarkInputError, match=msg) as e:
        read_records(tmp_path / "data.jsonl")
    assert "\n" not in str(e.value)


def test_malformed_csv_names_the_record(tmp_path):
    (tmp_path / "data.csv").write_text("Category,Definition,Prompt\nc,d,1\nc,d,2\n")  # a column of numbers
    with pytest.raises(BenchmarkInputError, match=r"data.csv: record 1: 'Prompt' missing or not text"):
        read_records(tmp_path / "data.csv")
    (tmp_path / "data.csv").write_text("Category,Definition\nc,d\n")
    with pytest.raises(BenchmarkInputError, match=r"data.csv: record 1: 'Prompt' missing or not text"):
        read_records(tmp_path / "data.csv")


def test_paper_rows_come_from_the_paper_text():
    """Every paper cell printed is in ../shared/paper's text (decimal points aside); lost digits print "?"."""
    from flacuna_jax.evals import report

    assert report.TABLE4_PAPER["FLACUNA-13B"] == {"harmless": "72.4", "helpful": "71.2", "honest": "70.5",
                                                 "other": "83.7", "avg": "74.5"}
    assert report.TABLE4_PAPER["VICUNA-13B"] == {"harmless": "62.0", "helpful": "66.1", "honest": "52.4",
                                                "other": "74.4", "avg": "63.7"}
    assert report.TABLE3_PAPER["FLACUNA-13B"] == {"mmlu": "49.4", "bbh": "32.5", "crass": "67.?"}
    assert report.TABLE5_PAPER["VICUNA-13B"]["informative"] == ("3.60", "3.96")
    assert report.TABLE5_PAPER["FLACUNA-13B"]["avg"] == ("3.45", "3.??")
    from pathlib import Path

    text = Path(__file__).resolve().parents[2] / "shared" / "paper" / "flacuna-2307.02053.txt"
    if not text.is_file():
        pytest.skip("the paper's text (../shared/paper) is not beside this checkout")
    flat = text.read_text()
    rows = {"VICUNA 13B 50.6 44.5 37.6 +05 32.6 -3.0 60.9 42.1 11.6 -1.8 38.7": report.TABLE2_PAPER["VICUNA-13B"],
            "VICUNA 13B 48.3 28.3 65.": report.TABLE3_PAPER["VICUNA-13B"],
            "FLACUNA 13B 49.4 32.5 67.": report.TABLE3_PAPER["FLACUNA-13B"],
            "VICUNA 3B 62.0 66.1 52.4 744 63.7": report.TABLE4_PAPER["VICUNA-13B"],
            "FLACUNA 3B 724 71.2 70.5 83.7 745": report.TABLE4_PAPER["FLACUNA-13B"],
            "VICUNA 13B 3.60 3.96 3.74 3.82 3.82 3.56 3.82 3.92 3.75 3.": report.TABLE5_PAPER["VICUNA-13B"],
            "FLACUNA 13B 3.02 3.42 348 3.52 3.38 3.02 3.92 3.80 345 3.": report.TABLE5_PAPER["FLACUNA-13B"]}
    for quoted, cells in rows.items():
        assert quoted in flat
        digits = "".join(c for c in quoted.split(" ", 2)[2] if c.isdigit())
        flat_cells = [v for cell in cells.values() for v in (cell if isinstance(cell, tuple) else (cell,))]
        for cell in flat_cells:  # each cell's digits appear, in order, in the quoted row's digits
            assert cell.replace(".", "").replace("?", "") in digits, (quoted, cell)


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = dataclasses.replace(tiny.PRESETS["mha"], vocab_size=CHAR_VOCAB)
    return write_decisive_model(tmp_path_factory.mktemp("impact_model"), config, seed=7)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp("impact_tok"))


RELEVANCE_REPLY = {"informative": "4", "professional": "I'd say 2/5", "argumentative": "10",
                   "creative": "It reads well."}  # scores 4, 5, 1, 1


def scripted(prompt: str, attempt: int) -> str:
    if prompt.startswith("Text: ") and "How relevant" in prompt:
        return next(RELEVANCE_REPLY[c] for c in CATEGORIES if f"Write a short {c} text" in prompt)
    return "Coherence: 3"


def run_cli(model_dir, tok_dir, tmp_path, stub_url, data, *extra):
    from flacuna_jax.eval import main

    return main(["--model", str(model_dir), "--tokenizer", str(tok_dir), "--benchmark", f"impact={data}",
                 "--judge-url", stub_url, "--judge-model", "stub-judge", "--batch-size", "4", "--name", "tiny",
                 "--out", str(tmp_path / "results.json"), "--predictions", str(tmp_path / "preds.jsonl"), *extra])


def test_cli_end_to_end_with_a_judge_that_fails_then_recovers(model_dir, tok_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    down = {"creative"}  # the judge answers 500 for the creative answer's relevance review, every time

    def reply(prompt, attempt):
        if "How relevant" in prompt and any(f"Write a short {c} text" in prompt for c in down):
            return Scripted(status=500)
        return scripted(prompt, attempt)

    with StubJudge(reply) as stub:
        with pytest.raises(SystemExit, match=r"^error: impact: 1 of 8 reviews failed, first: impact creative #3 "
                                             r"relevance: HTTP 500 .*, 2 tries; rerun the same command"):
            run_cli(model_dir, tok_dir, tmp_path, stub.base_url, data, "--judge-retries", "1")
        preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
        assert len(preds) == 4 and preds[3]["relevance"] is None and preds[3]["coherence"] == 3  # answers kept
        assert json.loads((tmp_path / "results.json").read_text())["incomplete"][0].startswith("impact: 1 of 8")
        cache = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
        assert len(cache) == 7

        down.clear()
        sent_before = len(stub.received)
        out = run_cli(model_dir, tok_dir, tmp_path, stub.base_url, data)
        rerun_prompts = stub.prompts()[sent_before:]

    # the rerun asked only for the missing review (the answers, regenerated greedily, are the same)
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert rerun_prompts == [judge_prompt("relevance", preds[3]["output"], RECORDS[3]["Prompt"])]
    # what the judge was sent: InstructEval's prompts for exactly these answers, one user message each
    sent = sorted(stub.prompts()[:sent_before])
    expected = sorted(judge_prompt(m, p["output"], r["Prompt"]) for p, r in zip(preds, RECORDS) for m in ("relevance", "coherence"))
    assert sorted(set(sent)) == expected and all(b["temperature"] == 0 for b in stub.received)

    assert [p["prompt"] for p in preds] == [r["Definition"] + " " + r["Prompt"] for r in RECORDS]
    assert all(len(p["output"]) > 0 for p in preds)
    assert [(p["relevance"], p["coherence"]) for p in preds] == [(4, 3), (5, 3), (1, 3), (1, 3)]
    assert [p["relevance_review"] for p in preds] == [RELEVANCE_REPLY[c] for c in CATEGORIES]
    assert all(p["coherence_review"] == "Coherence: 3" for p in preds)

    impact = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["impact"]
    assert impact == out["benchmarks"]["impact"]
    assert impact["relevance"] == 2.75 and impact["coherence"] == 3.0 and impact["score"] == 2.875 and impact["n"] == 4
    assert impact["tasks"]["professional/relevance"] == {"score": 5.0, "n": 1}
    assert impact["reviews_scored_1_by_the_fallback"] == {"relevance_no_digit": 1, "relevance_out_of_range": 1,
                                                          "coherence_no_digit": 0, "coherence_out_of_range": 0}
    assert impact["judge"] == {"url": stub.base_url, "model": "stub-judge"} and impact["prompt_style"] == "instructeval"
    printed = capsys.readouterr().out
    assert "Writing, IMPACT judged 1-5" in printed
    assert "| VICUNA-13B  |             3.60 |             3.96 |" in printed
    assert "|      3.75 |      3.?? |" in printed and "? = a digit lost in the paper's text, not guessed" in printed
    assert "| tiny        |             4.00 |             3.00 |              5.00 |" in printed
    assert "|      2.75 |      3.00 |" in printed


def test_cli_passes_the_prompt_style_and_judge_settings(tmp_path, monkeypatch):
    """--impact-prompt and the --judge-* flags reach the benchmark and the judge (no model needed)."""
    import flacuna_jax.eval as cli

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:1])
    built = {}

    def stop_at_model(a):
        raise SystemExit("stop: model")

    monkeypatch.setattr(cli, "load_from_args", stop_at_model)
    monkeypatch.setattr("flacuna_jax.tokenizer.load_tokenizer", lambda path: None)
    real_load = cli.load_benchmark
    monkeypatch.setattr(cli, "load_benchmark", lambda *a, **kw: built.setdefault("bench", real_load(*a, **kw)))
    with StubJudge() as stub, pytest.raises(SystemExit, match="stop: model"):
        run_cli("model", "tok", tmp_path, stub.base_url.removesuffix("/v1"), data, "--impact-prompt", "flacuna",
                "--judge-concurrency", "3", "--judge-timeout", "7", "--judge-retries", "2", "--judge-max-tokens", "64",
                "--judge-cache", str(tmp_path / "c.jsonl"))
    bench = built["bench"]
    assert bench.prompt_style == "flacuna" and bench.examples(lambda p: True)[0].prompt == generation_prompt(RECORDS[0], "flacuna")
    judge = bench.judge
    assert (judge.base_url, judge.model, judge.concurrency, judge.timeout_s, judge.retries, judge.max_tokens) == (
        stub.base_url, "stub-judge", 3, 7.0, 2, 64)
    assert judge.cache.path == tmp_path / "c.jsonl"


def test_cli_dead_judge_and_missing_flags_stop_before_generation(model_dir, tok_dir, tmp_path, monkeypatch):
    import flacuna_jax.eval as cli

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    monkeypatch.setattr(cli, "load_from_args", lambda a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"^error: judge http://127.0.0.1:\d+/v1: cannot connect .*is the server running\?$"):
        run_cli(model_dir, tok_dir, tmp_path, f"http://127.0.0.1:{free_port()}", data)
    with pytest.raises(SystemExit, match="needs a judge: --judge-url URL --judge-model NAME"):
        cli.main(["--model", str(model_dir), "--benchmark", f"impact={data}", "--out", str(tmp_path / "r.json")])
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(SystemExit, match="--judge-api-key-env NO_SUCH_KEY_VAR: that environment variable is not set"):
        run_cli(model_dir, tok_dir, tmp_path, "http://127.0.0.1:1", data, "--judge-api-key-env", "NO_SUCH_KEY_VAR")
    with pytest.raises(SystemExit, match=r"error: .*bad.jsonl:1: 'Prompt' missing"):
        (tmp_path / "bad.jsonl").write_text('{"Category": "c", "Definition": "d"}\n')
        with StubJudge() as stub:
            run_cli(model_dir, tok_dir, tmp_path, stub.base_url, tmp_path / "bad.jsonl")


def test_api_key_is_sent_only_from_the_named_variable(model_dir, tok_dir, tmp_path, monkeypatch):
    from flacuna_jax.evals.judge import ChatJudge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    seen = {}

    class Recording(ChatJudge):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen["key"] = self.client.api_key

    import flacuna_jax.evals.judge as judge_module

    monkeypatch.setattr(judge_module, "ChatJudge", Recording)
    from flacuna_jax.eval import build_parser, make_judge

    with StubJudge() as stub:
        args = ["--model", "m", "--out", str(tmp_path / "r.json"), "--judge-url", stub.base_url, "--judge-model", "x"]
        make_judge(build_parser().parse_args(args))
        assert seen["key"] == "none"
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-mine")
        make_judge(build_parser().parse_args(args + ["--judge-api-key-env", "MY_JUDGE_KEY"]))
        assert seen["key"] == "sk-mine"
