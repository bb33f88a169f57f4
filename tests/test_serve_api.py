"""The HTTP server (serve/api.py, serve/__main__.py) over loopback, with the official `openai` client:
greedy replies against `python -m flacuna_jax.generate` and transformers / PEFT, streaming, stop
strings, usage, n and seed, bad input, auth, disconnects, load, metrics, and the chat page in a
real headless chromium.

One server per module (fixture `server`: 127.0.0.1, an ephemeral port, stopped in teardown) on the
decisive tiny model with two PEFT adapters of different ranks and targets.
"""

import concurrent.futures as cf
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from tests.serve_fixtures import ServerThread, random_prompts, serve_args, transformers_references, write_served_model

KEY = "test-key"
MODELS = ("model", "alpha", "beta")  # the base (its directory's name) and the two adapters


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return write_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(served):
    from flacuna_jax.serve.__main__ import build_app

    app, engine = build_app(serve_args(served["model"], served["adapters"], api_key=KEY, max_body_bytes=65536))
    srv = ServerThread(app, engine).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def references(served):
    return transformers_references(served, "model")


def hf_greedy(ref, prompt, max_new, eos=2):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def complete_ids(client, model, prompt, max_tokens, **kw):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True}, **kw)
    return r.choices[0].token_ids, r


def chat(client, model, text, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def streamed_chat(client, model, messages, **kw):
    text, finish, usage = {}, {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return text, finish, usage


def wait_until(condition, timeout=300.0, step=None):
    """Polls `condition` (calling `step` between polls) until it holds; a generous deadline, never a timing assert."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s")
        if step is not None:
            step()
        time.sleep(0.01)


def metric(server, name):
    body = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", body, re.M).group(1))


# ------------------------------------------------------------------------------ correctness

def test_models_lists_the_base_and_each_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == list(MODELS)
    assert [getattr(m, "parent", None) for m in models] == [None, "model", "model"]


def test_greedy_completions_equal_transformers_alone_and_eight_concurrent(client, references):
    """Token ids through the server equal transformers' generate (PeftModel for an adapter), one
    request alone and 8 requests of different lengths and models in flight together."""
    names = ["model", "alpha", "beta", "model", "beta", "alpha", "alpha", "model"]
    prompts = random_prompts([5, 13, 8, 30, 2, 17, 9, 40], seed=1)
    expected = [hf_greedy(references[n], p, 14) for n, p in zip(names, prompts)]
    assert complete_ids(client, names[1], prompts[1], 14)[0] == expected[1]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: complete_ids(client, names[k], prompts[k], 14)[0], range(8)))
    assert got == expected
    assert len({tuple(x) for x in got}) == 8


def test_chat_equals_the_generate_cli_for_the_base_and_each_adapter(client, served, tmp_path):
    """Vicuna-template chat replies equal `python -m flacuna_jax.generate --data` (which folds the
    adapter into the base) token for token, and their text, streamed and not."""
    from flacuna_jax.generate import main as generate_main

    texts = ["hi", "what is 2+2?", "tell me a story"]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    for model in MODELS:
        out = tmp_path / f"{model}.jsonl"
        argv = ["--model", str(served["model"]), "--data", str(data), "--out", str(out), "--max-new-tokens", "12"]
        if model != "model":
            argv += ["--adapter", str(served["adapters"][model])]
        generate_main(argv)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        replies = [chat(client, model, t, extra_body={"return_token_ids": True}).choices[0] for t in texts]
        assert [r.token_ids for r in replies] == [row["tokens"] for row in rows], model  # token for token
        expected = [row["completion"] for row in rows]
        assert [r.message.content for r in replies] == expected, model
        streamed = [streamed_chat(client, model, [{"role": "user", "content": t}], max_tokens=12, temperature=0)[0][0]
                    for t in texts]
        assert streamed == expected, model


def test_the_judge_client_reads_what_the_server_writes(server, client, tmp_path):
    """Our server as IMPACT's judge endpoint (`evals/judge.py`: 4 in flight, the reply cache): each reply
    is the server's greedy chat reply to that prompt alone, and a second pass is all cache. (IMPACT's
    rubric prompts are over this tiny char model's 256-token window; `tests/test_evals_impact_real.py`
    runs them through the server on SmolLM2.)"""
    from flacuna_jax.evals.judge import ChatJudge, JudgeRequest

    prompts = [f"{mode}: {answer}" for mode in ("relevance", "coherence") for answer in ("light scatters", "it is", "no")]
    requests = [JudgeRequest(f"t{k}", p, f"prompt {k}") for k, p in enumerate(prompts)]
    judge = ChatJudge(server.url, "alpha", KEY, concurrency=4, max_tokens=8, timeout_s=300,
                      cache_path=tmp_path / "cache.jsonl")
    judge.check()
    replies = judge.ask(requests)
    expected = [chat(client, "alpha", p, max_tokens=8).choices[0].message.content for p in prompts]
    assert all(expected) and [r.text for r in replies] == expected and judge.stats["sent"] == len(prompts)
    assert [r.text for r in judge.ask(requests)] == expected and judge.stats["cached"] == len(prompts)


def test_streamed_equals_non_streamed_and_usage_counts(client, served):
    from flacuna_jax.templates import encode_generation_prompt
    from flacuna_jax.tokenizer import load_tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "and now?"}]
    r = client.chat.completions.create(model="beta", messages=messages, max_tokens=20, temperature=0,
                                       extra_body={"return_token_ids": True})
    text, finish, usage = streamed_chat(client, "beta", messages, max_tokens=20, temperature=0,
                                        stream_options={"include_usage": True})
    assert text[0] == r.choices[0].message.content and finish[0] == r.choices[0].finish_reason
    prompt = encode_generation_prompt([("hello", "hi!")], "and now?", load_tokenizer(served["model"]), "Be brief.")
    assert r.usage.prompt_tokens == len(prompt) == usage.prompt_tokens
    assert r.usage.completion_tokens == len(r.choices[0].token_ids) == usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model="alpha", prompt="abc", max_tokens=10, temperature=0)
    pieces = [ch.choices[0].text for ch in client.completions.create(model="alpha", prompt="abc", max_tokens=10,
                                                                     temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == c.choices[0].text and len(pieces) > 1


def test_stop_strings_cut_the_text_as_openai_does(client):
    full = chat(client, "alpha", "tell me a story", max_tokens=20).choices[0].message.content
    stop = full[6:8]
    first = full.index(stop)
    r = chat(client, "alpha", "tell me a story", max_tokens=20, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == full[:first] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20  # generation stopped there, its slot freed
    text, finish, _ = streamed_chat(client, "alpha", [{"role": "user", "content": "tell me a story"}],
                                    max_tokens=20, temperature=0, stop=stop)
    assert text[0] == full[:first] and finish[0] == "stop"


def test_n_and_seed_are_reproducible(client):
    kw = dict(model="model", prompt="once upon", max_tokens=12, temperature=1.0, top_p=0.9, n=3)
    a = client.completions.create(seed=5, **kw)
    b = client.completions.create(seed=5, **kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and [c.text for c in b.choices] == texts
    assert len(set(texts)) > 1  # the choices are drawn independently
    assert [c.text for c in client.completions.create(seed=6, **kw).choices] != texts
    single = client.completions.create(seed=5, **(kw | {"n": 1}))
    assert single.choices[0].text == texts[0]  # choice i's draws depend on (seed, i) only
    lists = client.completions.create(model="model", prompt=["once upon", "a time"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in lists.choices] == [0, 1, 2, 3] and lists.choices[0].text == lists.choices[1].text


# ------------------------------------------------------------------------------ bad input, auth, load

BAD = [  # (body, status, what the message must name)
    (b"{bad json", 400, "malformed JSON"),
    (b'{"model": "model", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    (b'{"model": "nope", "prompt": "a"}', 404, "nope"),
    (b'{"model": "model", "prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "model", "prompt": "a", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "model", "prompt": "' + b"x" * 300 + b'"}', 400, "window"),
    (b'{"model": "model", "prompt": "a", "temperature": -0.5}', 400, "temperature"),
    (b'{"model": "model", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}', 400, "stop"),
    (b'{"model": "model", "prompt": "a", "n": 99}', 400, "n"),
    (b'{"model": "model", "prompt": "a", "frobnicate": 1}', 400, "frobnicate"),
    (b'{"model": "model", "prompt": [1, 2, 100000]}', 400, "vocabulary"),
    (b'{"model": "model", "prompt": "' + b"x" * 70000 + b'"}', 413, "limit"),
]


@pytest.mark.parametrize("body,status,named", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, body, status, named):
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert named in error["message"] and error["type"]
    ok = httpx.post(server.url + "/v1/completions", json={"model": "model", "prompt": "ok", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_chat_errors_name_the_message(client):
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].role"):
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "a"},
                                                                {"role": "user", "content": "b"}])
    with pytest.raises(openai.BadRequestError, match="template"):  # the char tokenizer has no chat template
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "a"}],
                                       extra_body={"template": "tokenizer"})


def test_wrong_or_missing_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, json={"model": "model", "prompt": "a"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_a_full_queue_is_429_and_nothing_is_left_behind(server):
    engine = server.engine
    saved, engine.max_queue = engine.max_queue, 0
    try:
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "model", "prompt": ["a", "b"], "max_tokens": 2})
    finally:
        engine.max_queue = saved
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert engine.counts()["queued"] == 0


def test_client_gone_mid_stream_frees_its_slot(server):
    """The engine is driven by hand here (its thread paused), so the request is certainly mid-stream
    when the client goes away."""
    engine = server.engine
    engine.stop()
    try:
        cancelled = metric(server, 'flacuna_requests_total{status="cancelled"}')
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": "alpha", "prompt": "abcdef", "max_tokens": 200, "stream": True}) as r:
                lines = r.iter_lines()
                wait_until(lambda: engine.counts()["queued"] == 1)
                wait_until(lambda: any(s is not None and len(s.ids) >= 3 for s in engine.slots), step=engine.step)
                assert metric(server, "flacuna_requests_running") == 1
                assert next(line for line in lines if line.startswith("data: "))  # the stream is flowing
        # the handler cancels the request when it sees the disconnect; the next step frees the slot
        wait_until(lambda: metric(server, "flacuna_requests_running") == 0, step=engine.step)
        assert metric(server, 'flacuna_requests_total{status="cancelled"}') == cancelled + 1
    finally:
        engine.start()


def test_200_requests_from_32_clients(server):
    """None lost, none duplicated (each reply is its own prompt's), /health answers throughout."""
    prompts = [f"request {k}: " + "xyz"[k % 3] * (1 + k % 17) for k in range(20)]
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=300) as http:
        expected = {p: http.post(server.url + "/v1/completions", headers=headers,
                                 json={"model": "model", "prompt": p, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"]
                    for p in prompts}
    health, stop = [], threading.Event()

    def poll_health():
        with httpx.Client(timeout=60) as h:
            while not stop.is_set():
                health.append(h.get(server.url + "/health").status_code)
                time.sleep(0.05)

    def one(k):
        with httpx.Client(timeout=300) as http:
            r = http.post(server.url + "/v1/completions", headers=headers,
                          json={"model": MODELS[0], "prompt": prompts[k % 20], "max_tokens": 4, "temperature": 0})
            return k, r.status_code, r.json()

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with cf.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(200)))
    finally:
        stop.set()
        poller.join()
    assert sorted(k for k, _, _ in results) == list(range(200))
    assert all(status == 200 for _, status, _ in results)
    assert len({body["id"] for _, _, body in results}) == 200
    assert all(body["choices"][0]["text"] == expected[prompts[k % 20]] for k, _, body in results)
    assert health and set(health) == {200}


def test_metrics_and_health(server):
    body = httpx.get(server.url + "/metrics").text
    for name in ("flacuna_requests_queued", "flacuna_requests_running", "flacuna_generated_tokens_total",
                 "flacuna_time_to_first_token_seconds_count"):
        assert re.search(rf"^{name} \d", body, re.M), name
    assert metric(server, "flacuna_generated_tokens_total") > 0
    assert metric(server, "flacuna_time_to_first_token_seconds_count") > 0
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4


# ------------------------------------------------------------------------------ the chat page

def test_chat_page_in_headless_chromium(server, client):
    """The page lists the models, sends a message, shows the streamed reply (equal to the API's) and
    stops a reply with its Stop button."""
    from tests.cdp import Chromium, chromium_or_skip

    chromium_or_skip()
    answer = chat(client, "alpha", "hello there", max_tokens=30).choices[0]
    expected = answer.message.content
    browser = Chromium(server.url + "/")
    try:
        browser.evaluate(f"document.getElementById('api-key').value = {json.dumps(KEY)}; loadModels(); true")
        options = browser.wait_for("Array.from(document.querySelectorAll('#model option')).map(o => o.value).join(',')"
                                   " || false")
        assert options.split(",") == list(MODELS)
        browser.evaluate("document.getElementById('model').value = 'alpha';"
                         "document.getElementById('max-tokens').value = '30';"
                         "document.getElementById('input').value = 'hello there';"
                         "document.getElementById('send').click(); true")
        reply = browser.wait_for("(() => { const m = document.querySelector('.msg.assistant');"
                                 " return m && m.dataset.done === 'true' && m.dataset.reply; })()")
        assert reply == expected
        assert browser.evaluate("document.querySelector('.msg.assistant .meta').textContent").endswith("· " + answer.finish_reason)

        # Stop: the engine is paused so the reply is certainly in flight when the button is pressed
        engine = server.engine
        engine.stop()
        try:
            cancelled = metric(server, 'flacuna_requests_total{status="cancelled"}')
            browser.evaluate("document.getElementById('new-chat').click();"  # a fresh conversation, the whole window
                             "document.getElementById('max-tokens').value = '';"
                             "document.getElementById('input').value = 'more';"
                             "document.getElementById('send').click(); true")
            browser.wait_for("document.body.dataset.state === 'streaming'")
            wait_until(lambda: engine.counts()["queued"] == 1)
            browser.evaluate("document.getElementById('stop').click(); true")
            browser.wait_for("document.querySelector('.msg.assistant').dataset.done === 'true'")
            assert browser.evaluate("document.querySelector('.msg.assistant .meta').textContent").endswith("· stopped")
            wait_until(lambda: metric(server, 'flacuna_requests_total{status="cancelled"}') == cancelled + 1,
                       step=engine.step)
            assert engine.counts() == {"queued": 0, "running": 0, "slots": 4}
        finally:
            engine.start()
    finally:
        browser.close()


def test_page_is_one_offline_file(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)  # nothing fetched from elsewhere


def test_cli_help_and_bad_arguments(served, capsys):
    from flacuna_jax.serve.__main__ import build_parser, main

    text = build_parser().format_help()
    for flag in ("--adapter", "--run", "--base-quant", "--max-batch", "--max-model-len", "--api-key", "--host"):
        assert flag in text
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        main(["--model", str(served["model"]), "--tensor", "1", "--adapter", str(served["adapters"]["alpha"])])
