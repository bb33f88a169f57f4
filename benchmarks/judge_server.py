"""A real OpenAI-compatible server as the IMPACT judge, started from a command line on 127.0.0.1.

    with JudgeServer.from_env(".cache/smollm2") as server:   # tests/test_evals_impact_real.py, impact_judge
        server.base_url      # http://127.0.0.1:<port>/v1
        server.model_name    # what requests name as their model

FLACUNA_JUDGE_SERVER chooses the command line:
- "flacuna" (the default): our `python -m flacuna_jax.serve --model {model} --host 127.0.0.1 --port {port}`;
- "transformers": `transformers serve --host 127.0.0.1 --port {port} --device cpu {model}` (the reference
  server; it answers only requests that name the model exactly as given);
- any other value: a command template with {python}, {model} and {port}.
FLACUNA_JUDGE_MODEL overrides the model name (default: the id GET /v1/models lists when it lists one,
else the model path as given). The server runs in its own process group, its output in a log file;
it is ready once GET /v1/models answers at all, and `stop()` terminates the group (SIGKILL after 30 s).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "flacuna": "{python} -m flacuna_jax.serve --model {model} --host 127.0.0.1 --port {port}",
    "transformers": "{python} -m transformers.cli.transformers serve --host 127.0.0.1 --port {port} --device cpu {model}",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JudgeServer:
    def __init__(self, template: str, model: str, model_name: str | None = None, ready_timeout_s: float = 600):
        self.template, self.model, self._model_name = template, model, model_name
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="judge_server_", suffix=".log")[1])
        self.model_name = model_name or model

    @classmethod
    def from_env(cls, model: str) -> "JudgeServer":
        choice = os.environ.get("FLACUNA_JUDGE_SERVER", "flacuna")
        return cls(COMMANDS.get(choice, choice), model, os.environ.get("FLACUNA_JUDGE_MODEL"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "JudgeServer":
        import httpx

        self.port = _free_port()
        cmd = self.template.format(python=shlex.quote(sys.executable), model=shlex.quote(str(self.model)), port=self.port)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"judge server exited ({self.proc.returncode}): {cmd}\n" + "\n".join(tail))
            try:
                resp = httpx.get(self.base_url + "/models", timeout=5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"judge server not ready after {self.ready_timeout_s:.0f} s: {cmd}") from None
                time.sleep(1)
        if self._model_name is None and resp.status_code == 200:
            ids = [m.get("id") for m in resp.json().get("data", [])]
            if len(ids) == 1 and ids[0]:
                self.model_name = ids[0]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
