"""`python -m flacuna_jax.score` against log-likelihoods computed with transformers."""

import json
import shutil

import pytest
import torch

from flacuna_jax import score
from tests.helpers import hf_reference


def _reference(ref, tokenizer, context, continuation):
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = ref(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(whole[n_ctx:])
    rows = torch.arange(n_ctx - 1, len(whole) - 1)
    ll = logp[rows, targets].sum().item()
    greedy = bool((logits[rows].argmax(-1) == targets).all())
    return ll, greedy, len(whole) - n_ctx


def test_score_cli_matches_transformers(char_tokenizer_dir, tmp_path):
    """On a decisive model (tests.helpers.write_decisive_model) with continuations that ARE its
    greedy decoding and others that are not: loglik, is_greedy and num_tokens of every request."""
    import dataclasses

    from flacuna_jax import tiny
    from flacuna_jax.tokenizer import load_tokenizer
    from tests.helpers import CHAR_VOCAB, greedy_requests, write_decisive_model

    model_dir = write_decisive_model(tmp_path / "model", dataclasses.replace(tiny.PRESETS["gqa"], vocab_size=CHAR_VOCAB),
                                     seed=5)
    for f in char_tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    tok = load_tokenizer(model_dir)
    ref = hf_reference(model_dir)
    reqs = greedy_requests(ref, tok, ["The capital of France is", "2 + 2 =", "Q: why?", "x" * 40], n_new=3)
    reqs += [("Q: ", "a much longer continuation, with punctuation!"), ("", "hello")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in reqs))
    score.main(["--model", str(model_dir), "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                "--batch-size", "2"])
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(got) == len(reqs)
    expected = [_reference(ref, tok, c, x) for c, x in reqs]
    for g, (ll, greedy, n) in zip(got, expected):
        assert g["num_tokens"] == n
        assert abs(g["loglik"] - ll) <= 1e-3
        assert g["is_greedy"] == greedy
    assert [g["is_greedy"] for g in got[:8]] == [True, False] * 4  # the greedy ones are greedy here too


def test_malformed_line_names_its_number(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"context": "a", "continuation": "b"}\n{"context": "a"}\n')
    with pytest.raises(score.ScoreInputError, match=r"in.jsonl:2:"):
        score.read_requests(p)
    p.write_text('{"context": "a", "continuation": "b"}\nnot json\n')
    with pytest.raises(score.ScoreInputError, match=r"in.jsonl:2: invalid JSON"):
        score.read_requests(p)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("[1]\n")
    with pytest.raises(SystemExit) as e:
        score.main(["--model", str(tmp_path), "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o")])
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


def test_repeated_scoring_reuses_one_compiled_scorer(tiny_model_dir, char_tokenizer_dir):
    """In-training evaluation scores again and again: same model and widths -> no new compile."""
    from flacuna_jax import hf
    from flacuna_jax.tokenizer import load_tokenizer

    model, params = hf.load_pretrained(tiny_model_dir("mha"))
    tok = load_tokenizer(char_tokenizer_dir)
    reqs = [("The answer is", " yes"), ("Pick one:", " b")]
    first = score.score_requests(model, params, tok, reqs, batch_size=2)
    second = score.score_requests(model, params, tok, reqs, batch_size=2)
    assert first == second
    assert score.make_token_scorer(model)._cache_size() == 1


def test_a_request_longer_than_the_window_is_cut_from_the_left_or_refused(tiny_model_dir, char_tokenizer_dir):
    """Context + continuation beyond the window: the context loses its first tokens (lm-eval's rule)
    and every continuation token is still scored; a continuation alone beyond it is refused."""
    import dataclasses

    from flacuna_jax import hf
    from flacuna_jax.tokenizer import load_tokenizer

    model_dir = tiny_model_dir("mha")
    model, params = hf.load_pretrained(model_dir)
    window = 16
    model = model.clone(config=dataclasses.replace(model.config, max_position_embeddings=window))
    tok = load_tokenizer(char_tokenizer_dir)
    context, continuation = "the context is much longer than the window", " abcdefghij"
    [got] = score.score_requests(model, params, tok, [(context, continuation)], batch_size=1)
    whole = tok(context + continuation)["input_ids"]
    n = len(whole) - len(tok(context)["input_ids"])
    kept = whole[-(window + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(hf_reference(model_dir)(torch.tensor([kept[:-1]])).logits[0].double(), -1)
    ref = logp[torch.arange(len(kept) - 1 - n, len(kept) - 1), torch.tensor(kept[-n:])].sum().item()
    assert got["num_tokens"] == n == len(continuation)
    assert abs(got["loglik"] - ref) <= 1e-3

    fits = ("ctx", "x" * window)  # exactly the window: the last context token conditions the first
    assert score.score_requests(model, params, tok, [fits], batch_size=1)[0]["num_tokens"] == window
    with pytest.raises(score.ScoreInputError, match=r"request 2: the continuation is 17 tokens, longer than .* 16 tokens"):
        score.score_requests(model, params, tok, [fits, ("ctx", "x" * (window + 1))], batch_size=1)
