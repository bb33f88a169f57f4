"""Shared by the serving tests: a tiny decisive model with PEFT adapters, and a server on a thread.

The server binds 127.0.0.1 on an ephemeral port, runs uvicorn and the engine on threads of the test
process (the model is loaded once), and `stop()` ends both.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import threading
import time
from pathlib import Path

import numpy as np

from tests.helpers import CHAR_VOCAB, write_char_tokenizer, write_decisive_model, write_peft_adapter

ADAPTERS = {  # name -> (rank, alpha, targets): different ranks and targets, padded into one bank
    "alpha": (4, 8.0, ("q_proj", "v_proj")),
    "beta": (2, 4.0, ("k_proj", "o_proj", "gate_proj", "down_proj")),
}


def write_served_model(root: Path) -> dict:
    """A decisive tiny GQA model with the char tokenizer beside it, and PEFT adapters written by PEFT."""
    from flacuna_jax import tiny

    config = dataclasses.replace(tiny.PRESETS["gqa"], vocab_size=CHAR_VOCAB)
    model_dir = write_decisive_model(root / "model", config, seed=3)
    write_char_tokenizer(model_dir)
    adapters = {name: write_peft_adapter(model_dir, root / name, rank, alpha, targets, seed=10 + k, b_scale=0.3)
                for k, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items())}
    return {"model": model_dir, "adapters": adapters}


def transformers_references(served: dict, base_name: str) -> dict:
    """Model id -> the transformers model it must equal: the base, and PEFT's PeftModel for each adapter."""
    from peft import PeftModel

    from tests.helpers import hf_reference

    refs = {base_name: hf_reference(served["model"])}
    for name, path in served["adapters"].items():
        refs[name] = PeftModel.from_pretrained(hf_reference(served["model"]), str(path)).eval()
    return refs


def serve_args(model_dir, adapters: dict, **overrides) -> argparse.Namespace:
    from flacuna_jax.serve.__main__ import build_parser

    # one prefill bucket (64) holds every short test prompt: few compiles
    argv = ["--model", str(model_dir), "--tensor", "1", "--max-batch", "4", "--max-model-len", "256", "--min-prefill-bucket", "64"]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


class ServerThread:
    """uvicorn + the engine on threads, on 127.0.0.1 and a free port; `stop()` ends both."""

    def __init__(self, app, engine):
        import uvicorn

        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()
        self.sock.close()


def random_prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, CHAR_VOCAB, n - 1).tolist() for n in lengths]
