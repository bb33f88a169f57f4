"""What the benchmark scripts share: the repo root, the child-process environment, JSON lines.

Benchmarks that need fresh XLA flags or a separate accelerator client (the planner's fake devices,
the two sides of `mfu`, every benchmark under `run_all`) run as `python -m ...` children; a child
prints one JSON line last, and `run_json` returns it as a dict or raises `BenchError` with the
tail of what the child wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


class BenchError(RuntimeError):
    pass


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: fake CPU device counts dropped from XLA_FLAGS (the
    child chooses its own devices), other XLA flags kept, no hub access, `extra` added."""
    env = dict(os.environ)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES_FLAG)]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_json(args: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Runs `python ARGS` in the repo root; its last stdout line that is a JSON object."""
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env or child_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: python {' '.join(args)}") from None
    result = last_json_line(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = [line for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()][-3:]
        raise BenchError(f"exit {proc.returncode}: " + " | ".join(tail or ["no output"]))
    return result


def emit(result: dict) -> dict:
    print(json.dumps(result), flush=True)
    return result
