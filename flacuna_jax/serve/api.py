"""The HTTP side: FastAPI routes that translate OpenAI requests into engine requests, and back.

Handlers never run the model: they validate, tokenize, `engine.submit` (one engine request per
prompt, its n choices in n slots) and await the events the engine thread hands over through the
event loop (`call_soon_threadsafe`). A streamed reply is server-sent events ending in
`data: [DONE]`; a client that goes away (mid-stream, or while a non-streamed reply is computed)
cancels its requests, which frees their slots at the engine's next step.

Errors are OpenAI's error JSON {"error": {"message", "type", "param", "code"}}: 400 for invalid
bodies (the message names the field), 401 without the right `Authorization: Bearer` key (every
/v1 route, when the server has one), 404 for an unknown model, 413 for a body over the limit, 429
when the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flacuna_jax.serve import schemas as S
from flacuna_jax.serve.engine import Engine, Event, QueueFull, Sampling
from flacuna_jax.serve.metrics import prometheus_text
from flacuna_jax.serve.prompts import PromptError, Prompts

PAGE = Path(__file__).parent / "static" / "chat.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        body = S.ErrorResponse(error=S.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


@dataclass(frozen=True)
class Limits:
    max_n: int = 8
    max_prompts: int = 32  # prompts in one completions request
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    """A model id the server answers to, and its adapter index in the engine's bank (0: the base)."""

    id: str
    adapter: int
    root: str
    parent: str | None = None


def create_app(engine: Engine, prompts: Prompts, models: Sequence[ServedModel], *, api_key: str | None = None,
               limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="flacuna_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.models = engine, list(models)
    by_id = {m.id: m for m in models}
    created = int(time.time())
    vocab = engine.model.config.vocab_size
    window = engine.max_model_len

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), type_="not_found_error" if e.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            message = err["msg"].removeprefix("Value error, ")
            raise ApiError(400, f"{param}: {message}" if param else message, param) from None

    def served(model_id: str) -> ServedModel:
        if model_id not in by_id:
            raise ApiError(404, f"the model {model_id!r} does not exist (served: {', '.join(by_id)})", "model",
                           code="model_not_found")
        return by_id[model_id]

    async def accept(request: Request, schema: type[S._Request]) -> tuple[Any, ServedModel]:
        """A completion request's checks before any work: the key, the body, the model, `n`."""
        check_key(request)
        req = await read_body(request, schema)
        model = served(req.model)
        if req.n > limits.max_n:
            raise ApiError(400, f"n: at most {limits.max_n}", "n")
        return req, model

    def samplings(req: S._Request, n_prompt: int, max_tokens: int, base_index: int) -> list[Sampling]:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        out = []
        for j in range(req.n):
            seed = choice_seed(req.seed, base_index + j)
            out.append(Sampling(max_tokens, temperature, top_p, seed, req.stop_strings()))
        return out

    def token_budget(ids: list[int], asked: int | None, default: int | None, prompt_param: str) -> int:
        room = window - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's window (--max-model-len) is {window} "
                                f"tokens, prompt and completion together", prompt_param, code="context_length_exceeded")
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise ApiError(400, f"max_tokens {asked} is too large: {len(ids)} prompt tokens + {asked} exceed this server's "
                                f"window of {window} tokens (at most {room} here)", "max_tokens", code="context_length_exceeded")
        return asked

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", **engine.counts()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        cards = [S.ModelCard(id=m.id, created=created, parent=m.parent, root=m.root) for m in models]
        return S.ModelList(data=cards).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, model = await accept(request, S.CompletionRequest)
        texts = req.prompt if isinstance(req.prompt, list) and not _is_ids(req.prompt) else [req.prompt]
        if len(texts) > limits.max_prompts:
            raise ApiError(400, f"prompt: at most {limits.max_prompts} prompts in one request", "prompt")
        jobs = []
        for k, text in enumerate(texts):
            param = "prompt" if len(texts) == 1 else f"prompt[{k}]"
            try:
                ids = prompts.completion_ids(text, vocab, param)
            except PromptError as e:
                raise ApiError(400, f"{e.param}: {e}", e.param) from None
            budget = token_budget(ids, req.max_tokens, 16, param)
            jobs.append(Job(ids, samplings(req, k, budget, k * req.n), prompts.decode_plain))
        run = Run(engine, model.adapter, jobs)
        await run.submit()
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return sse(run, request, lambda: completion_chunks(run, rid, req, created_now()))
        await run.wait(request)
        choices = [_choice(S.CompletionChoice(index=i, text=c.text, finish_reason=c.finish,
                                              token_ids=c.ids if req.return_token_ids else None)) for i, c in enumerate(run.choices)]
        return _envelope(S.CompletionResponse, rid, created_now(), req.model, choices, run.usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, model = await accept(request, S.ChatRequest)
        try:
            ids, decode = prompts.chat(req.messages, req.template)
        except PromptError as e:
            raise ApiError(400, f"{e.param}: {e}", e.param) from None
        budget = token_budget(ids, req.token_limit(), None, "messages")
        run = Run(engine, model.adapter, [Job(ids, samplings(req, 0, budget, 0), decode)])
        await run.submit()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return sse(run, request, lambda: chat_chunks(run, rid, req, created_now()))
        await run.wait(request)
        choices = [_choice(S.ChatChoice(index=i, message=S.AssistantMessage(content=c.text), finish_reason=c.finish,
                                        token_ids=c.ids if req.return_token_ids else None)) for i, c in enumerate(run.choices)]
        return _envelope(S.ChatResponse, rid, created_now(), req.model, choices, run.usage())

    return app


def _is_ids(prompt: list) -> bool:
    return all(isinstance(x, int) for x in prompt)


def created_now() -> int:
    return int(time.time())


def choice_seed(seed: int | None, index: int) -> int:
    """The 32-bit seed of choice `index`: from the request's seed (reproducible), else fresh."""
    if seed is None:
        return secrets.randbits(32)
    return int(np.random.SeedSequence([seed & (2 ** 64 - 1), index]).generate_state(1)[0])


# ------------------------------------------------------------------------------ requests in flight

@dataclass
class Job:
    """One prompt of a request: its ids, its choices and how its replies decode."""

    ids: list[int]
    choices: list[Sampling]
    decode: Callable[[Sequence[int]], str]


class ChoiceState:
    def __init__(self):
        self.text, self.ids, self.finish = "", [], None


class Run:
    """The engine requests of one HTTP request; events arrive on the event loop, in order, through a queue."""

    def __init__(self, engine: Engine, adapter: int, jobs: list[Job]):
        self.engine, self.adapter, self.jobs = engine, adapter, jobs
        self.offsets = np.cumsum([0] + [len(j.choices) for j in jobs]).tolist()
        self.choices = [ChoiceState() for _ in range(self.offsets[-1])]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        self.open = len(self.choices)

    async def submit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for k, job in enumerate(self.jobs):
                def on_event(e: Event, k=k):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (self.offsets[k] + e.choice, e))

                self.requests.append(self.engine.submit(job.ids, job.choices, on_event, job.decode, self.adapter))
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"the server is busy: {e}; retry later", type_="rate_limit_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise ApiError(400, str(e)) from None

    def cancel(self) -> None:
        for r in self.requests:
            self.engine.cancel(r)

    def _apply(self, index: int, event: Event) -> None:
        c = self.choices[index]
        c.text += event.text
        c.ids += event.token_ids
        if event.finish_reason is not None:
            c.finish = event.finish_reason
            self.open -= 1

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished."""
        while self.open:
            index, event = await self.queue.get()
            self._apply(index, event)
            yield index, event

    async def wait(self, request: Request) -> None:
        """Until every choice finished; cancels the engine requests if the client disconnects meanwhile."""
        while self.open:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), 0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise ApiError(499, "the client disconnected") from None
                continue
            self._apply(index, event)
        if any(c.finish == "error" for c in self.choices):
            raise ApiError(500, "the engine failed while generating this request", type_="server_error")

    def usage(self) -> S.Usage:
        prompt = sum(len(j.ids) for j in self.jobs)
        completion = sum(len(c.ids) for c in self.choices)
        return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(run: Run, request: Request, chunks: Callable[[], AsyncIterator[dict]]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks():
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the response task is cancelled)
            if run.open:
                run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


ERROR_CHUNK = {"error": {"message": "the engine failed while generating this request", "type": "server_error",
                         "param": None, "code": None}}


def _choice(model: BaseModel) -> dict:
    """A choice as OpenAI writes it: logprobs and finish_reason always present (null), token_ids only when asked."""
    out = model.model_dump()
    if out.get("token_ids") is None:
        out.pop("token_ids", None)
    return out


def _envelope(cls: type[BaseModel], rid: str, created: int, model: str, choices: list[dict], usage: S.Usage | None = None) -> dict:
    out = cls(id=rid, created=created, model=model, choices=[]).model_dump(exclude_none=True)
    out["choices"] = choices
    if usage is not None:
        out["usage"] = usage.model_dump()
    return out


async def completion_chunks(run: Run, rid: str, req: S.CompletionRequest, created: int) -> AsyncIterator[dict]:
    async for index, e in run.events():
        if e.finish_reason == "error":
            yield ERROR_CHUNK
            return
        if not e.text and e.finish_reason is None and not req.return_token_ids:
            continue
        choice = S.CompletionChoice(index=index, text=e.text, finish_reason=e.finish_reason,
                                    token_ids=list(e.token_ids) if req.return_token_ids else None)
        yield _envelope(S.CompletionResponse, rid, created, req.model, [_choice(choice)])
    if req.stream_options and req.stream_options.include_usage:
        yield _envelope(S.CompletionResponse, rid, created, req.model, [], run.usage())


async def chat_chunks(run: Run, rid: str, req: S.ChatRequest, created: int) -> AsyncIterator[dict]:
    def chunk(index: int, delta: S.Delta, finish: str | None = None, ids: Sequence[int] | None = None) -> dict:
        choice = _choice(S.ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                           token_ids=list(ids) if req.return_token_ids and ids is not None else None))
        choice["delta"] = delta.model_dump(exclude_none=True)
        return _envelope(S.ChatChunk, rid, created, req.model, [choice])

    for index in range(len(run.choices)):
        yield chunk(index, S.Delta(role="assistant", content=""))
    async for index, e in run.events():
        if e.finish_reason == "error":
            yield ERROR_CHUNK
            return
        if e.text or req.return_token_ids:
            yield chunk(index, S.Delta(content=e.text), None, e.token_ids)
        if e.finish_reason is not None:
            yield chunk(index, S.Delta(), e.finish_reason)
    if req.stream_options and req.stream_options.include_usage:
        yield _envelope(S.ChatChunk, rid, created, req.model, [], run.usage())
