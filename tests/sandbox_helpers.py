"""What the sandbox tests share: the strongest mode check, a directory the program can see, leftovers."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from flacuna_jax.evals import sandbox, sandbox_seccomp

ROOT = Path(__file__).resolve().parents[1]


def in_forked_child(body) -> dict:
    """body() in a forked child, which exits right after; its JSON-able dict back (an exception in it
    comes back as {"error": "Type: message"}). For what must not touch the test process: namespaces,
    privileges, seccomp filters."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            try:
                result = body()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                result = {"error": f"{type(e).__name__}: {e}"}
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)

# Each hostile program starts with this: `attempt(name, fn)` prints one JSON line, [name, "ok", result]
# or [name, "refused", errno name]; `call` turns a libc -1 into OSError.
PRELUDE = '''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    try:
        print(json.dumps([name, "ok", repr(fn())[:200]]), flush=True)
    except OSError as e:
        print(json.dumps([name, "refused", errno.errorcode.get(e.errno, str(e))]), flush=True)
def call(fn, *args):
    result = fn(*args)
    if result == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return result
'''


def attempts(output: str) -> dict[str, tuple[str, str]]:
    """{name: ("ok", repr of the result) or ("refused", errno name)} from a PRELUDE program's output."""
    found = {}
    for line in output.splitlines():
        if line.startswith("["):
            name, status, detail = json.loads(line)
            found[name] = (status, detail)
    return found


@functools.lru_cache(maxsize=1)
def strongest_available() -> bool:
    """Whether this machine allows the sandbox its strongest mode: root, the four namespaces, an
    architecture the seccomp filter knows. Asked of the kernel, not of the sandbox: a sandbox that
    stopped reaching that mode must fail the tests that expect it, not skip them."""
    if os.geteuid() != 0 or not sandbox_seccomp.supported():
        return False
    pid = os.fork()
    if pid == 0:  # CLONE_NEWNS | NEWNET | NEWPID | NEWIPC, in a child that then leaves
        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x00020000 | 0x40000000 | 0x20000000 | 0x08000000) == 0
                 else 1)
    return os.waitpid(pid, 0)[1] == 0


def live_processes(owned_by) -> list[int]:
    """Processes not yet dead (zombies are: they wait only for this machine's init to reap them) whose
    uid satisfies `owned_by`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if owned_by(os.stat(f"/proc/{pid}").st_uid):
                with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                    if f.read().rpartition(")")[2].split()[0] != "Z":
                        pids.append(int(pid))
        except OSError:
            pass
    return pids


def sandbox_processes() -> list[int]:
    """Live processes owned by a sandbox uid of this test process (a leftover of one of its programs;
    another pytest worker's programs, running meanwhile, have uids of their own)."""
    first = sandbox._UID_BASE + (os.getpid() % 100_000) * sandbox._MAX_WORKERS
    return live_processes(lambda uid: first <= uid < first + sandbox._MAX_WORKERS)


def wait_until_gone(processes, seconds: float = 10.0) -> list[int]:
    """`processes()` once it is empty, or after `seconds` (the kernel kills a PID namespace's processes
    when its init dies, but not before our wait for the sandbox's outer process returns)."""
    deadline = time.monotonic() + seconds
    while (left := processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _hidden_by_the_sandbox(path: str) -> bool:
    home = os.path.realpath(os.path.expanduser("~"))
    return any(path == p or path.startswith(p + "/") for p in ("/tmp", "/run", "/dev/shm", home))


def make_visible_dir() -> Path:
    """A fresh world-writable directory the sandboxed program can see (not under /tmp, /run or our
    home, which it cannot): only the read-only mount keeps it from writing there."""
    for base in ("/var/tmp", str(ROOT)):
        real = os.path.realpath(base)
        if os.path.isdir(real) and os.access(real, os.W_OK) and not _hidden_by_the_sandbox(real):
            path = Path(tempfile.mkdtemp(prefix="flacuna-sandbox-test-", dir=real))
            path.chmod(0o777)
            return path
    raise RuntimeError("no directory outside /tmp, /run and the home directory to test with")


def remove_visible_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
