"""A chat model as a judge, over any OpenAI-compatible endpoint: send chat prompts, get the replies.

It knows nothing of benchmarks. `ChatJudge.ask(requests)` sends each request's prompt as one user
message at temperature 0 (what InstructEval's `OpenAIModel.run` sends: no system message, no token
limit unless `max_tokens` is given) through the official `openai` client, so the endpoint may be
OpenAI's (`https://api.openai.com/v1`, the paper's ChatGPT setting), vLLM, `transformers serve` or
our own `python -m flacuna_jax.serve`: only `base_url`, `model` and an optional API key differ.

- At most `concurrency` requests are in flight (a thread pool; the client is thread-safe).
- Each request has `timeout_s`; a timeout, a refused connection, HTTP 408/409/429 or 5xx, or an empty
  reply is retried up to `retries` more times after `backoff_s * 2**k` seconds (capped at
  `max_backoff_s`; a 429's Retry-After, when longer, is honoured up to 60 s). Any other HTTP error
  (400 bad request, 401 bad key, 404 unknown model) is final at once. InstructEval retries forever;
  a bounded number is what lets a run end with a clear error instead of hanging.
- A request that still fails gets a one-line error naming its `label`; the others go on. After a
  request fails because the judge cannot be reached at all, the requests not yet sent are not sent
  (the judge is down; each would only wait through its own retries).
- Every reply is appended to the JSONL cache (`cache_path`) the moment it arrives, keyed by (judge
  model, request tag, prompt), and flushed to disk; a rerun asks only what the cache lacks. A torn
  last line (the process killed mid-write) is cut off; any other malformed line is an error naming
  FILE:LINE.
- A reply the endpoint filtered (`finish_reason == "content_filter"`, or an error saying "The response
  was filtered") becomes InstructEval's text for it, "The response was filtered".
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

FILTERED = "The response was filtered"  # InstructEval's OpenAIModel: the review of a filtered reply
RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx


class JudgeError(ValueError):
    """The judge could not be used (unreachable, rejected the key, a malformed cache); one line."""


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
    tag: str  # with the judge model and the prompt, the cache key (IMPACT: the mode)
    prompt: str  # sent as the one user message
    label: str  # names the request in errors


@dataclasses.dataclass(frozen=True)
class JudgeReply:
    text: str | None  # None: the request failed (see error)
    error: str | None = None
    cached: bool = False
    finish_reason: str | None = None
    tries: int = 0


def api_base(url: str) -> str:
    """The API base the client appends `/chat/completions` to: a URL with no path gets `/v1`
    (`http://127.0.0.1:8000` -> `http://127.0.0.1:8000/v1`); any other path is kept as given."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise JudgeError(f"--judge-url {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    return url.rstrip("/") + "/v1" if parsed.path in ("", "/") else url.rstrip("/")


class ReplyCache:
    """The JSONL cache: one {"judge_model", "tag", "prompt", "reply", "finish_reason"} per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[tuple[str, str, str], dict] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                key = (rec["judge_model"], rec["tag"], rec["prompt"])
                if not isinstance(rec["reply"], str):
                    raise TypeError("reply is not a string")
            except (ValueError, KeyError, TypeError) as e:
                if i == last:  # a write the process did not finish: cut it off; that reply is asked again
                    print(f"judge cache {self.path}:{i + 1}: dropped an unfinished last line", file=sys.stderr)
                    with self.path.open("r+b") as f:
                        f.truncate(sum(len(x) + 1 for x in lines[:i]))
                    return
                raise JudgeError(f"judge cache {self.path}:{i + 1}: not a cache record ({e}); "
                                 "fix or remove the file") from None
            self.entries[key] = rec
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")

    def get(self, model: str, tag: str, prompt: str) -> dict | None:
        return self.entries.get((model, tag, prompt))

    def append(self, model: str, tag: str, prompt: str, reply: str, finish_reason: str | None) -> None:
        rec = {"judge_model": model, "tag": tag, "prompt": prompt, "reply": reply, "finish_reason": finish_reason}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(("\n" if self._needs_newline else "") + line)
                f.flush()
                os.fsync(f.fileno())  # a reply paid for is on disk before the next one is counted
            self._needs_newline = False
            self.entries[(model, tag, prompt)] = rec


class ChatJudge:
    """Sends chat prompts to one model at one OpenAI-compatible endpoint (module docstring)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, concurrency: int = 8,
                 timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_tokens: int | None = None, cache_path: str | Path | None = None):
        import openai

        if (concurrency < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0
                or (max_tokens is not None and max_tokens < 1)):
            raise JudgeError("need judge concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0, max tokens >= 1")
        if not model:
            raise JudgeError("the judge needs a model name (--judge-model)")
        self.base_url, self.model = api_base(base_url), model
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.backoff_s, self.max_backoff_s, self.max_tokens = backoff_s, max_backoff_s, max_tokens
        # A placeholder key, never OPENAI_API_KEY from the environment: a key goes only where it is asked to.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout_s,
                                    max_retries=0)
        self.cache = ReplyCache(cache_path) if cache_path else None
        self._abort = threading.Event()
        self._abort_reason = ""
        self.stats: dict[str, int] = {}

    # ---------------------------------------------------------------- reachability
    def check(self) -> None:
        """Fails fast (JudgeError) when the endpoint cannot be reached or rejects the key, before a
        long generation; any other answer (a server without /models included) counts as reachable."""
        import openai

        try:
            models = self.client.with_options(timeout=min(self.timeout_s, 10.0)).models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise JudgeError(f"judge {self.base_url}: cannot connect ({_cause(e)}); is the server running?") from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise JudgeError(f"judge {self.base_url}: HTTP {e.status_code}, the API key was refused "
                                 "(--judge-api-key-env names the variable holding it)") from None
            return
        ids = [m.id for m in getattr(models, "data", []) or []]
        if ids and self.model not in ids:
            print(f"warning: judge {self.base_url} lists no model {self.model!r} (it lists "
                  f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})", file=sys.stderr)

    # ---------------------------------------------------------------- asking
    def ask(self, requests: Sequence[JudgeRequest], on_done: Callable[[int], None] | None = None) -> list[JudgeReply]:
        """One reply per request, in order; cached ones without a request. Never raises for a failed
        request (its reply has `error`); `self.stats` counts cached / sent / failed / retried."""
        replies: list[JudgeReply | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            hit = self.cache.get(self.model, r.tag, r.prompt) if self.cache else None
            if hit is not None:
                replies[i] = JudgeReply(hit["reply"], cached=True, finish_reason=hit.get("finish_reason"))
            else:
                todo.append(i)
        self.stats = {"requests": len(requests), "cached": len(requests) - len(todo), "sent": len(todo),
                      "failed": 0, "retried": 0}
        if on_done and len(todo) < len(requests):
            on_done(len(requests) - len(todo))
        self._abort.clear()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self._ask_one, requests[i]): i for i in todo}
            for fut in concurrent.futures.as_completed(futures):
                reply = fut.result()
                replies[futures[fut]] = reply
                self.stats["failed"] += reply.text is None
                self.stats["retried"] += max(reply.tries - 1, 0)
                if on_done:
                    on_done(1)
        return replies  # type: ignore[return-value]

    def _ask_one(self, req: JudgeRequest) -> JudgeReply:
        import openai

        last, unreachable, tries, delay = "", False, 0, 0.0
        for attempt in range(self.retries + 1):
            if self._abort.is_set():
                return JudgeReply(None, f"{req.label}: not sent ({self._abort_reason})", tries=tries)
            if attempt:
                time.sleep(delay)
            tries += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            unreachable = False
            try:
                kwargs = {} if self.max_tokens is None else {"max_tokens": self.max_tokens}
                resp = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": req.prompt}], temperature=0, **kwargs)
            except openai.APITimeoutError:
                last = f"no reply within {self.timeout_s:g} s"
                continue
            except openai.APIConnectionError as e:
                last, unreachable = f"cannot connect to {self.base_url} ({_cause(e)})", True
                continue
            except openai.APIStatusError as e:
                if FILTERED in str(e) or getattr(e, "code", None) == "content_filter":
                    return self._keep(req, FILTERED, "content_filter", tries)
                last = f"HTTP {e.status_code} ({_short(e.message)})"
                if e.status_code in RETRYABLE_STATUS or e.status_code >= 500:
                    delay = max(delay, _retry_after(e))
                    continue
                return JudgeReply(None, f"{req.label}: the judge refused the request: {last}", tries=tries)
            choice = resp.choices[0] if resp.choices else None
            if choice is not None and choice.finish_reason == "content_filter":
                return self._keep(req, FILTERED, "content_filter", tries)
            text = choice.message.content if choice is not None and choice.message is not None else None
            if not text:  # InstructEval asks again until the reply is not empty
                last = "an empty reply"
                continue
            return self._keep(req, text, choice.finish_reason, tries)
        if unreachable and not self._abort.is_set():
            self._abort_reason = f"the judge at {self.base_url} could not be reached"
            self._abort.set()
        return JudgeReply(None, f"{req.label}: {last}, {tries} tries", tries=tries)

    def _keep(self, req: JudgeRequest, text: str, finish_reason: str | None, tries: int) -> JudgeReply:
        if self.cache is not None:
            self.cache.append(self.model, req.tag, req.prompt, text, finish_reason)
        return JudgeReply(text, finish_reason=finish_reason, tries=tries)


def _cause(e: BaseException) -> str:
    inner = e.__cause__ or e.__context__ or e
    return _short(f"{type(inner).__name__}: {inner}")


def _short(text: object, limit: int = 160) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit - 3] + "..."


def _retry_after(e) -> float:
    """A 429/503's Retry-After in seconds (at most 60), else 0."""
    try:
        return min(60.0, max(0.0, float(e.response.headers.get("retry-after", "0"))))
    except (AttributeError, TypeError, ValueError):
        return 0.0
