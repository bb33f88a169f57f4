"""The CPU kernels of `csrc/` (XLA FFI handlers): built on first use for this machine, loaded, registered.

Build: every source of `csrc/` is compiled on first use into one library, for this CPU (`-O3
-march=native`), by `$CXX` (else `c++`), into `$FLACUNA_JAX_CACHE` (else
`$XDG_CACHE_HOME/flacuna_jax`, else `~/.cache/flacuna_jax`), named by a hash of the sources, the
flags, jaxlib's version, the compiler and the CPU; written to a temporary file and renamed, so
processes building at once never load a partial library. One library, so that the kernels share
the helper threads of `csrc/parallel_for.h` (a helper that finished a matmul joins the attention
after it). Kernels that cannot be built are refused with the reason (`register`), and their callers
run XLA instead.
Compiling for the machine that runs it, rather than shipping a binary, keeps the wheel free of one
CPU's ISA and one jaxlib's ABI (SmolLM2's decode step: 139 ms with `-march=native` vs 150 ms with
the baseline x86-64 ISA).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

CSRC = Path(__file__).parent / "csrc"
# -ffp-contract=fast: a * b + c as one fused multiply-add (what a kernel's inner loops are written for)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 600  # a compiler that hangs fails the build (the caller then runs XLA)


def cache_dir() -> Path:
    if os.environ.get("FLACUNA_JAX_CACHE"):
        return Path(os.environ["FLACUNA_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flacuna_jax"


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the machine and, on Linux, the CPU's model and feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        pass
    return platform.machine() + "".join(lines)


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cc"))


def build(compiler: str | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """The kernels' shared library, compiled unless this machine's is already cached. A compiler that
    fails raises RuntimeError with its first error line, one that runs past `timeout_s` is killed and
    raises RuntimeError too."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    files = sources()
    text = b"".join(path.read_bytes() for path in [*files, *sorted(CSRC.glob("*.h"))])  # with the headers
    key = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                      _cpu_identity().encode(), compiler.encode()])).hexdigest()[:16]
    library = cache_dir() / f"kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    include = Path(jax.ffi.include_dir())
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        try:
            done = subprocess.run([compiler, *FLAGS, "-w", f"-I{include}", f"-I{CSRC}", *map(str, files),
                                   "-o", str(partial), "-pthread"], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{compiler} did not finish building {CSRC.name}/ in {timeout_s:g} s") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise RuntimeError(f"{compiler} could not build {CSRC.name}/: {first}")
        os.replace(partial, library)  # atomic: another process sees the whole library or none
    return library


@functools.cache
def _library() -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(build()))


@functools.cache
def register(symbol: str, target: str) -> str | None:
    """Builds and loads the kernels' library (once per process) and registers its handler `symbol`
    as the FFI target `target`: None, or why the kernel cannot run."""
    try:
        handler = getattr(_library(), symbol)
    except AttributeError:
        return f"the csrc/ library has no {symbol}"
    except (RuntimeError, OSError) as e:
        return f"the csrc/ kernels could not be built: {e}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None
