"""An OpenAI-compatible chat endpoint with scripted replies, on 127.0.0.1 (tests; benchmarks.impact_judge).

    with StubJudge(reply=lambda prompt, attempt: "4", latency_s=0.1) as stub:
        stub.base_url        # http://127.0.0.1:<ephemeral port>/v1
        stub.received        # every chat request body, in arrival order
        stub.max_in_flight   # the most requests it was answering at once

`reply(prompt, attempt)` gets the user message and how many times that exact prompt has now arrived
(1 the first time) and returns the reply text, or a `Scripted` for anything else: an HTTP error
status (with headers, e.g. Retry-After), a delay (longer than the client's timeout: a hung judge),
an empty reply or a finish_reason such as "content_filter". `models_status` scripts GET /v1/models
(401: a refused key; 404: a server without it). FastAPI + uvicorn in a thread of this
process; `stop()` (or leaving the `with`) shuts it down and joins the thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections import Counter
from typing import Callable

from fastapi import FastAPI, Request  # at module level: the route's annotations are resolved by name
from fastapi.responses import JSONResponse


@dataclasses.dataclass(frozen=True)
class Scripted:
    content: str | None = ""
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"
    headers: dict = dataclasses.field(default_factory=dict)


def free_port() -> int:
    """A port nothing listens on (bound then released): a dead judge."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubJudge:
    def __init__(self, reply: Callable[[str, int], str | Scripted] | None = None, latency_s: float = 0.0,
                 models: tuple[str, ...] = ("stub-judge",), models_status: int = 200):
        self.reply = reply or (lambda prompt, attempt: "4")
        self.latency_s, self.models, self.models_status = latency_s, models, models_status
        self.received: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def prompts(self) -> list[str]:
        return [b["messages"][-1]["content"] for b in self.received]

    def _app(self):
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            if self.models_status != 200:
                return JSONResponse({"error": {"message": f"scripted {self.models_status}"}}, status_code=self.models_status)
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "stub"} for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            with self._lock:
                self.received.append(body)
                self.attempts[prompt] += 1
                attempt = self.attempts[prompt]
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                script = self.reply(prompt, attempt)
                script = Scripted(script) if isinstance(script, str) else script
                await asyncio.sleep(self.latency_s + script.delay_s)
                if script.status != 200:
                    return JSONResponse({"error": {"message": f"scripted {script.status}", "type": "stub", "code": None}},
                                        status_code=script.status, headers=script.headers)
                return {"id": f"stub-{len(self.received)}", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", ""),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": script.content},
                                     "finish_reason": script.finish_reason}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            finally:
                with self._lock:
                    self.in_flight -= 1

        return app

    def start(self) -> "StubJudge":
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="error",
                                timeout_graceful_shutdown=1, lifespan="off", log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="stub-judge", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stub judge did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = self._thread = None

    def __enter__(self) -> "StubJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
