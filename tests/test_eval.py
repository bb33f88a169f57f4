"""Evaluation: InstructEval prompt formats, multiple-choice accuracy and held-out loss against an
independent transformers computation, the CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from flacuna_jax import hf, tiny
from flacuna_jax.eval import main
from flacuna_jax.evals.loglik import (CRASS_PAPER_SHOTS, EvalInputError, EvalSuite, Question, build_prompt,
                                      read_questions, score_mc)
from tests.helpers import CHAR_VOCAB, hf_reference, write_decisive_model

LOSS_TOL = 1e-4


@pytest.fixture(scope="module")
def decisive_dir(tmp_path_factory):
    config = dataclasses.replace(tiny.PRESETS["mha"], vocab_size=CHAR_VOCAB)
    return write_decisive_model(tmp_path_factory.mktemp("decisive_eval"), config, seed=5)


@pytest.fixture(scope="module")
def tok(char_tokenizer_dir):
    from flacuna_jax.tokenizer import load_tokenizer

    return load_tokenizer(char_tokenizer_dir)


def test_prompt_formats_follow_instruct_eval():
    shot = Question("1+1?", ("2", "3"), 0, "high_school_math")
    q = Question("2+2?", ("3", "4"), 1, "high_school_math")
    p = build_prompt("mmlu", q, [shot])
    assert p.context == ("The following are multiple choice questions (with answers) about  high school math.\n\n"
                         "1+1?\nA. 2\nB. 3\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nAnswer:")
    assert p.continuations == (" A", " B") and p.calibration is None
    assert build_prompt("crass", q, [shot]).context == "1+1?\nA. 2\nB. 3\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nAnswer:"
    p = build_prompt("bbh", q, [shot])
    assert p.context == "1+1?\nAnswer: 2\n\n2+2?\nAnswer:" and p.continuations == (" 3", " 4")
    p = build_prompt("hhh", Question("hi?", ("rude", "kind"), 1), [])
    assert p.context.startswith("You are a chatbot and a human ask you the following question:\n\nQuery: hi?\n")
    assert "A. rude\n\nB. kind\n\n" in p.context and p.context.endswith("A or B?\nChoice: ")
    assert "A. rude\n\nB. rude\n\n" in p.calibration and p.continuations == ("A", "B")
    assert CRASS_PAPER_SHOTS[2].choices[CRASS_PAPER_SHOTS[2].answer] == "That is not possible."


def test_read_questions_answers_and_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "x", "choices": ["a", "b", "c"], "answer": "c"}\n'
                    '{"question": "y", "choices": ["a", "b"], "answer": 1, "shot": true}\n')
    qs = read_questions(path)
    assert [q.answer for q in qs] == [2, 1] and qs[1].shot
    path.write_text('{"question": "x", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(EvalInputError, match="q.jsonl:1: answer 2 out of range"):
        read_questions(path)
    path.write_text('{"question": "x", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(EvalInputError, match="at least 2"):
        read_questions(path)


def _hf_loglik(ref, tok, context, continuation):
    """Independent: sum of log p over the continuation's characters (one token each)."""
    ids = tok(context + continuation)["input_ids"]
    n = len(continuation)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))


def _synthetic(path, n, n_choices, seed, style):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "sun", "tree", "nine", "four", "cold"]
    lines = []
    for i in range(n):
        choices = [str(x) for x in rng.choice(words, n_choices, replace=False)]
        lines.append({"question": f"Q{i}: which is {rng.choice(words)}?", "choices": choices,
                      "answer": int(rng.integers(n_choices)) if style != "mmlu" else "ABCD"[rng.integers(n_choices)]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_multiple_choice_accuracy_matches_transformers(decisive_dir, tok, tmp_path):
    model, params = hf.load_pretrained(decisive_dir)
    ref = hf_reference(decisive_dir)
    tasks = [("mmlu:toy", "mmlu", str(_synthetic(tmp_path / "toy.jsonl", 10, 4, 0, "mmlu"))),
             ("bbh:toy", "bbh", str(_synthetic(tmp_path / "bbh.jsonl", 8, 3, 1, "bbh"))),
             ("hhh:toy", "hhh", str(_synthetic(tmp_path / "hhh.jsonl", 3, 2, 2, "hhh")))]
    suite = EvalSuite(model, tok, tasks, k=2, batch_size=8)
    metrics = suite(params)
    for task in suite.tasks:
        ours = score_mc(model, params, tok, task.prompts)
        preds = []
        for p in task.prompts:
            ll = []
            for c in p.continuations:  # lm-eval: the context's trailing space belongs to the continuation
                ctx = p.context.rstrip()
                score = _hf_loglik(ref, tok, ctx, p.context[len(ctx):] + c)
                if p.calibration is not None:
                    cal = p.calibration.rstrip()
                    score -= _hf_loglik(ref, tok, cal, p.calibration[len(cal):] + c)
                ll.append(score)
            preds.append(int(np.argmax(ll)))
        assert [int(np.argmax(s)) for s in ours] == preds, task.name
        expected_acc = float(np.mean([p == a for p, a in zip(preds, task.answers)]))
        assert metrics[f"{task.name}/acc"] == expected_acc
        assert metrics[f"{task.name}/n"] == len(task.answers)
    assert suite.tasks[0].k == 2 and metrics["mmlu:toy/n"] == 8  # the first k lines are the shots
    assert suite.tasks[2].k == 0 and metrics["hhh:toy/n"] == 3


RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there!"},
                                  {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Hi again."}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
]


def test_heldout_loss_matches_transformers(decisive_dir, tok, tmp_path):
    from flacuna_jax.templates import encode

    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model, params = hf.load_pretrained(decisive_dir)
    metrics = EvalSuite(model, tok, heldout=str(path), batch_size=2, cache_dir=str(tmp_path / "cache"))(params)
    ref = hf_reference(decisive_dir)
    total, count = 0.0, 0
    for r in RECORDS:
        enc = encode(r["conversations"], tok)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([enc.ids])).logits[0].double(), -1).numpy()
        for t in range(1, len(enc.ids)):
            if enc.mask[t]:
                total -= logp[t - 1, enc.ids[t]]
                count += 1
    assert metrics["heldout/tokens"] == count and metrics["heldout/examples"] == 3
    assert abs(metrics["heldout/loss"] - total / count) <= LOSS_TOL
    assert abs(np.log(metrics["heldout/perplexity"]) - total / count) <= LOSS_TOL


def test_cli_writes_json_and_table(decisive_dir, char_tokenizer_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    crass = _synthetic(tmp_path / "crass.jsonl", 3, 3, 4, "crass")
    out = tmp_path / "results.json"
    metrics = main(["--model", str(decisive_dir), "--tokenizer", str(char_tokenizer_dir), "--task", f"crass={crass}",
                    "--heldout", str(heldout), "--k", "3", "--out", str(out)])["metrics"]
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and set(metrics) >= {"crass:crass/acc", "heldout/loss", "heldout/perplexity"}
    assert metrics["crass:crass/n"] == 3  # the paper's 3 shots, all 3 lines scored
    table = capsys.readouterr().out
    assert "heldout/perplexity" in table and len(table.splitlines()) == len(metrics) + 2
    bbh = _synthetic(tmp_path / "bbh.jsonl", 5, 2, 6, "bbh")
    metrics = main(["--model", str(decisive_dir), "--tokenizer", str(char_tokenizer_dir), "--task", f"bbh={bbh}"])["metrics"]
    assert metrics["bbh:bbh/n"] == 2  # InstructEval's BBH default: the first 3 lines are shots
