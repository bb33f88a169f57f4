"""An OpenAI-compatible server for a LLaMA-family model and its LoRA adapters, with a chat page.

    python -m flacuna_jax.serve --model HF_DIR [--adapter NAME=PEFT_DIR ...] [--run NAME=RUN_DIR ...] \\
        [--base-quant none|int8|nf4] [--dtype float32|bfloat16] [--host 127.0.0.1] [--port 8000] \\
        [--max-batch 8] [--max-model-len 2048] [--api-key KEY]

Model ids: the base is the --model directory's name (or --served-model-name), each adapter its NAME;
requests pick one with "model". Every adapter is applied per row on the one frozen base, so
requests for different adapters share each decode step. Routes: POST /v1/completions,
POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and the chat page at /.
The API key also comes from $FLACUNA_API_KEY; with one set, every /v1 route needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flacuna_jax.config import BASE_QUANTS
from flacuna_jax.dtypes import FLOAT_DTYPES
from flacuna_jax.inference import add_cpu_kernel_args

API_KEY_ENV = "FLACUNA_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face LLaMA-family directory (the frozen base)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR",
                   help="serve a PEFT LoRA adapter as model id NAME (repeatable)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="serve a LoRA training run's latest checkpoint as model id NAME (repeatable)")
    p.add_argument("--served-model-name", help="the base model's id (default: the --model directory's name)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32", help="compute and parameter dtype")
    p.add_argument("--base-quant", choices=BASE_QUANTS, default="none",
                   help="quantize the base's decoder projections as bitsandbytes does (adapters applied on top)")
    add_cpu_kernel_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: sequences generated together")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence, prompt and completion (default: the model's window, at most 2048)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices per prompt)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--min-prefill-bucket", type=int, default=16,
                   help="smallest prompt/cache width compiled (cache widths are powers of two from here up to "
                        "--max-model-len; prompt widths too up to 128, then multiples of 128)")
    p.add_argument("--chat-template", choices=("vicuna", "tokenizer"), default="vicuna",
                   help="chat prompt format: Vicuna v1.1 as in training, or the tokenizer's own template")
    p.add_argument("--tensor", type=int, default=-1,
                   help="devices the model is split over (tensor parallel; -1: every local device)")
    p.add_argument("--api-key", default=None, help=f"require this bearer key on /v1 routes (also ${API_KEY_ENV})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def load_engine(a: argparse.Namespace):
    """(engine, prompts, served models) from the parsed arguments: the base on its mesh, every adapter stacked."""
    import jax

    from flacuna_jax.hf import load_pretrained
    from flacuna_jax.lm_eval import generation_eos_ids
    from flacuna_jax.model import Runtime, unrolled
    from flacuna_jax.serve.adapters import build_bank, load_adapters, parse_named, place_bank
    from flacuna_jax.serve.api import ServedModel
    from flacuna_jax.serve.engine import Engine
    from flacuna_jax.serve.slots import slot_cache_sharding
    from flacuna_jax.serve.prompts import Prompts
    from flacuna_jax.sharding import make_mesh
    from flacuna_jax.tokenizer import load_tokenizer

    parse_named(a.adapter, "--adapter"), parse_named(a.run, "--run")  # bad syntax fails before the model loads
    devices = jax.local_devices()
    tensor = len(devices) if a.tensor == -1 else a.tensor
    if not 1 <= tensor <= len(devices):
        raise ValueError(f"--tensor {a.tensor}: between 1 and the {len(devices)} local devices (or -1)")
    mesh = make_mesh(1, 1, tensor, devices[:tensor]) if tensor > 1 else None
    dtype = FLOAT_DTYPES[a.dtype]
    tokenizer = load_tokenizer(a.tokenizer or a.model)
    runtime = Runtime(compute_dtype=dtype, param_dtype=dtype, base_quant=a.base_quant, decode_attention=a.decode_attention)
    model, params = load_pretrained(a.model, runtime, mesh=mesh)
    base_id = a.served_model_name or Path(a.model).resolve().name
    adapters = load_adapters(a.adapter, a.run, model.config, base_id)
    served = [ServedModel(base_id, 0, str(a.model))]
    if adapters:
        bank, tree = build_bank(adapters, model.config)
        model = model.clone(bank=bank)
        from flacuna_jax.lora import merge_params

        params = merge_params(place_bank(model, tree, mesh), params)
        served += [ServedModel(ad.name, i, ad.source, parent=base_id) for i, ad in enumerate(adapters, start=1)]
    model, params = unrolled(model, params, a.matmul)  # one buffer per layer: what a decode step runs fastest on
    eos = set(generation_eos_ids(a.model, model.config.eos_token_id))
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    prompts = Prompts(tokenizer, sorted(eos), a.chat_template)
    max_len = a.max_model_len or min(model.config.max_position_embeddings, 2048)
    engine = Engine(model, params, eos_ids=sorted(eos), max_batch=a.max_batch, max_model_len=max_len,
                    max_queue=a.max_queue, pad_id=tokenizer.pad_token_id or 0, min_bucket=a.min_prefill_bucket,
                    cache_sharding=slot_cache_sharding(mesh) if mesh is not None else None)
    for ids in prompts.shared_prefixes():
        engine.register_prefix(ids)
    return engine, prompts, served


def build_app(a: argparse.Namespace) -> tuple[Any, Any]:
    """(FastAPI app, engine not yet started) from the parsed arguments."""
    from flacuna_jax.serve.api import Limits, create_app

    engine, prompts, served = load_engine(a)
    key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, prompts, served, api_key=key,
                     limits=Limits(max_n=min(a.max_n, a.max_batch), max_body_bytes=a.max_body_bytes))
    return app, engine


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, engine = build_app(a)
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    engine.start()
    names = ", ".join(m.id for m in app.state.models)
    print(f"serving {names} on http://{a.host}:{a.port} (chat page at /)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
