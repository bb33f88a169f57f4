"""score.py's shared-context rows: the choices of a question are scored on one row (the context once,
each continuation a branch that sees only the context and itself), equal to transformers scoring each
request on its own; rows split when a context's branches overflow the window."""

import dataclasses

import numpy as np
import pytest
import torch

from flacuna_jax import hf, score
from tests.helpers import hf_reference

LL_TOL = 1e-3  # summed log-likelihood, as tests/test_score.py


def _requests(vocab, seed=0):
    """Two questions with choices of 1-4 tokens, a request with a context of its own, one with nothing scored."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    q1, q2 = ids(11), ids(6)
    reqs = [(q1 + ids(k), k) for k in (1, 3, 2, 4)] + [(q2 + ids(k), k) for k in (2, 2, 1)]
    return reqs + [(ids(9), 3), (ids(5), 0)]


def _reference(ref, ids, n):
    """transformers on this request alone: (summed log p of the last n ids, all of them the argmax)."""
    with torch.no_grad():
        logits = ref(torch.tensor([ids[:-1]])).logits[0].double()
    rows, targets = torch.arange(len(ids) - 1 - n, len(ids) - 1), torch.tensor(ids[len(ids) - n:])
    return torch.log_softmax(logits, -1)[rows, targets].sum().item(), bool((logits[rows].argmax(-1) == targets).all())


def test_choices_sharing_a_context_share_a_row_and_equal_transformers(tiny_model_dir):
    path = tiny_model_dir("gqa")
    model, params = hf.load_pretrained(path)
    reqs = _requests(model.config.vocab_size)
    rows = score.plan_rows([r for r in reqs if r[1]], model.config.max_position_embeddings + 1)
    assert [len(r.requests) for r in rows] == [4, 3, 1]  # one row per distinct context
    assert rows[0].width == 11 + 0 + 2 + 1 + 3 and rows[0].slots == 1 + 3 + 2 + 4
    got = score.score_token_requests(model, params, reqs, batch_size=2)
    ref = hf_reference(path)
    assert got[-1] == {"loglik": 0.0, "is_greedy": True, "num_tokens": 0}
    for (ids, n), g in zip(reqs[:-1], got[:-1]):
        ll, greedy = _reference(ref, ids, n)
        assert g["num_tokens"] == n and abs(g["loglik"] - ll) <= LL_TOL and g["is_greedy"] == greedy


def test_a_context_whose_branches_overflow_the_window_takes_several_rows(tiny_model_dir):
    model, params = hf.load_pretrained(tiny_model_dir("mha"))
    window = 16
    model = model.clone(config=dataclasses.replace(model.config, max_position_embeddings=window))
    rng = np.random.default_rng(1)
    ctx = rng.integers(3, model.config.vocab_size, 6).tolist()
    reqs = [(ctx + rng.integers(3, model.config.vocab_size, k).tolist(), k) for k in (5, 6, 4, 7)]
    rows = score.plan_rows(reqs, window + 1)
    assert [r.requests for r in rows] == [[0, 1], [2, 3]] and [r.width for r in rows] == [6 + 4 + 5, 6 + 3 + 6]
    together = score.score_token_requests(model, params, reqs, batch_size=4)
    alone = [score.score_token_requests(model, params, [r], batch_size=1)[0] for r in reqs]
    for t, a in zip(together, alone):
        assert t["num_tokens"] == a["num_tokens"] and abs(t["loglik"] - a["loglik"]) <= 1e-4
    with pytest.raises(ValueError, match="request 3: 3 scored tokens need at least 4 ids, got 3"):
        score.score_token_requests(model, params, [([1, 2], 0), ([1, 2, 3], 1), ([1, 2, 3], 3)])


def test_bucketed_widths():
    assert [score.bucket(n) for n in (1, 16, 17, 21, 33, 65, 100, 129, 1000)] == [16, 16, 20, 24, 40, 80, 112, 160, 1024]
    assert [score.power_of_two(n) for n in (1, 3, 8, 9)] == [1, 4, 8, 16]
