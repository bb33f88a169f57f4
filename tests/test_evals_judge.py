"""The judge client (flacuna_jax/evals/judge.py) against a scripted OpenAI-compatible stub on loopback
(benchmarks/judge_stub.py): what it sends, bounded concurrency, retries with backoff on 429 / 5xx /
timeouts / empty replies and no retry on other errors, the JSONL cache (written as replies arrive,
read back so a rerun asks only what is missing, a torn last line skipped), a dead port. ~15 s."""

import json

import pytest

from benchmarks.judge_stub import Scripted, StubJudge, free_port
from flacuna_jax.evals.judge import FILTERED, ChatJudge, JudgeError, JudgeRequest, ReplyCache, api_base


def requests(n, tag="relevance"):
    return [JudgeRequest(tag, f"prompt {i}", f"sample {i}") for i in range(n)]


def judge_for(stub, tmp_path=None, **kw):
    kw.setdefault("backoff_s", 0.0)
    return ChatJudge(stub.base_url, "stub-judge", cache_path=tmp_path / "cache.jsonl" if tmp_path else None, **kw)


def test_sends_one_user_message_at_temperature_zero_and_the_key_only_when_given():
    with StubJudge(lambda p, n: f"review of {p}") as stub:
        replies = judge_for(stub).ask(requests(3))
        judge_for(stub, max_tokens=7).ask([JudgeRequest("t", "with a limit", "x")])
    assert [r.text for r in replies] == ["review of prompt 0", "review of prompt 1", "review of prompt 2"]
    assert all(r.error is None and r.tries == 1 and not r.cached for r in replies)
    assert sorted(b["messages"][0]["content"] for b in stub.received[:3]) == ["prompt 0", "prompt 1", "prompt 2"]
    for body in stub.received[:3]:
        assert body == {"model": "stub-judge", "messages": [{"role": "user", "content": body["messages"][0]["content"]}],
                        "temperature": 0}  # InstructEval's OpenAIModel.run: no system message, no token limit
    assert stub.received[3]["max_tokens"] == 7


def test_api_base_appends_v1_only_to_a_bare_host():
    assert api_base("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert api_base("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert api_base("http://h/openai/deployments/x") == "http://h/openai/deployments/x"
    with pytest.raises(JudgeError, match="expected http"):
        api_base("127.0.0.1:8000")


def test_concurrency_is_bounded_and_defaults_to_eight():
    assert ChatJudge("http://127.0.0.1:1/v1", "m").concurrency == 8
    with StubJudge(latency_s=1.0) as stub:
        replies = judge_for(stub, concurrency=4).ask(requests(8))
    assert all(r.text == "4" for r in replies)
    assert stub.max_in_flight == 4  # 8 requests of 1 s each: always 4 at once, never more


def test_retries_429_500_timeouts_and_empty_replies_then_succeeds():
    def reply(prompt, attempt):
        if attempt > 1:
            return "Score: 5"
        return {"prompt 0": Scripted(status=429, headers={"retry-after": "0"}), "prompt 1": Scripted(status=503),
                "prompt 2": Scripted(delay_s=30), "prompt 3": Scripted(content="")}[prompt]

    with StubJudge(reply) as stub:
        judge = judge_for(stub, retries=2, timeout_s=1.5)
        replies = judge.ask(requests(4))
    assert [r.text for r in replies] == ["Score: 5"] * 4
    assert all(stub.attempts[f"prompt {i}"] >= 2 for i in range(4)) and judge.stats["failed"] == 0


def test_bounded_retries_then_a_one_line_error_naming_the_sample(tmp_path):
    def reply(prompt, attempt):
        return Scripted(status=500) if prompt == "prompt 1" else Scripted(delay_s=30) if prompt == "prompt 2" else "3"

    with StubJudge(reply) as stub:
        judge = judge_for(stub, tmp_path, retries=2, timeout_s=1.5)
        replies = judge.ask(requests(4))
    assert [r.text for r in replies] == ["3", None, None, "3"]
    assert stub.attempts["prompt 1"] == 3 and stub.attempts["prompt 2"] == 3  # 1 + 2 retries, no more
    assert replies[1].error == "sample 1: HTTP 500 (Error code: 500 - scripted 500), 3 tries"
    assert replies[2].error == "sample 2: no reply within 1.5 s, 3 tries"
    assert "\n" not in replies[1].error + replies[2].error
    cached = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert sorted(c["prompt"] for c in cached) == ["prompt 0", "prompt 3"]  # what was judged is kept
    assert {k: judge.stats[k] for k in ("requests", "cached", "sent", "failed")} == {
        "requests": 4, "cached": 0, "sent": 4, "failed": 2}
    assert judge.stats["retried"] >= 4  # 2 for each failed one (a slow reply under load may add more)


def test_other_http_errors_are_not_retried():
    with StubJudge(lambda p, n: Scripted(status=404)) as stub:
        reply = judge_for(stub, retries=3).ask(requests(1))[0]
    assert stub.attempts["prompt 0"] == 1 and reply.text is None
    assert reply.error.startswith("sample 0: the judge refused the request: HTTP 404")


def test_a_filtered_reply_is_instructevals_text():
    with StubJudge(lambda p, n: Scripted(content=None, finish_reason="content_filter")) as stub:
        reply = judge_for(stub).ask(requests(1))[0]
    assert reply.text == FILTERED == "The response was filtered" and reply.finish_reason == "content_filter"


def test_cache_rerun_asks_only_what_is_missing(tmp_path):
    failing = {"prompt 2", "prompt 5"}
    with StubJudge(lambda p, n: Scripted(status=500) if p in failing else f"R {p}") as stub:
        first = judge_for(stub, tmp_path, retries=0).ask(requests(6))
        assert [r.text is None for r in first] == [False, False, True, False, False, True]
        failing.clear()  # the judge recovers
        sent_before = len(stub.received)
        second = judge_for(stub, tmp_path, retries=0).ask(requests(6))
        assert sorted(stub.prompts()[sent_before:]) == ["prompt 2", "prompt 5"]
        assert [r.text for r in second] == [f"R prompt {i}" for i in range(6)]
        assert [r.cached for r in second] == [True, True, False, True, True, False]
        # another judge model or another tag is another key
        sent_before = len(stub.received)
        judge_for(stub, tmp_path).ask(requests(1, tag="coherence"))
        assert stub.prompts()[sent_before:] == ["prompt 0"]
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0]).keys() == {"judge_model", "tag", "prompt", "reply", "finish_reason"}


def test_cache_skips_a_torn_last_line_and_rejects_a_corrupt_one(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = json.dumps({"judge_model": "m", "tag": "t", "prompt": "p", "reply": "4", "finish_reason": "stop"})
    path.write_text(good + "\n" + good[:20])  # killed mid-write
    cache = ReplyCache(path)
    assert cache.get("m", "t", "p")["reply"] == "4" and len(cache.entries) == 1
    cache.append("m", "t", "q", "5", "stop")
    assert ReplyCache(path).get("m", "t", "q")["reply"] == "5"  # appended on a line of its own
    path.write_text("{not json\n" + good + "\n")
    with pytest.raises(JudgeError, match=r"cache.jsonl:1: not a cache record"):
        ReplyCache(path)


def test_a_dead_judge_fails_fast(tmp_path):
    judge = ChatJudge(f"http://127.0.0.1:{free_port()}", "m", retries=1, backoff_s=0.0)
    with pytest.raises(JudgeError, match=r"cannot connect .*is the server running\?"):
        judge.check()
    replies = judge.ask(requests(30))
    assert all(r.text is None for r in replies)
    assert "cannot connect" in replies[0].error or "not sent" in replies[0].error
    # once a request has failed for want of a judge, the ones not yet sent are not sent
    assert sum("not sent (the judge at" in r.error for r in replies) >= 30 - 2 * judge.concurrency


def test_check_reports_a_refused_key_and_tolerates_a_server_without_models(capsys):
    with StubJudge(models=("other",)) as stub:
        judge_for(stub).check()
    assert "lists no model 'stub-judge' (it lists other)" in capsys.readouterr().err
    with StubJudge(models_status=404) as stub:
        judge_for(stub).check()  # reachable: fine
    with StubJudge(models_status=401) as stub:
        with pytest.raises(JudgeError, match="HTTP 401, the API key was refused"):
            judge_for(stub).check()
