"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine.

| module | one concern |
|---|---|
| `engine.py` | the scheduler: decode slots, queue, admission, tokens to text, cancellation (no HTTP) |
| `slots.py` | the slots' KV cache on the device and the jitted prefill / insert / decode-step functions |
| `adapters.py` | the PEFT adapters and training runs served, stacked into one `model.AdapterBank` |
| `text.py` | generated ids -> text, incrementally, cut at stop strings as OpenAI does |
| `prompts.py` | chat messages -> ids (Vicuna v1.1 as training renders it, or the tokenizer's template) |
| `schemas.py` | OpenAI's request / response bodies as pydantic models, with the server's limits |
| `api.py` | FastAPI routes: translate requests into engine requests, stream SSE, errors, auth |
| `metrics.py` | `GET /metrics` in Prometheus' text format |
| `__main__.py` | `python -m flacuna_jax.serve`: load, build, run uvicorn |
| `static/chat.html` | the chat page served at `/` |
"""
