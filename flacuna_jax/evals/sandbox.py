"""The one place in flacuna_jax that executes model output: a Python program in a contained subprocess.

    outcome = run_program(source, Limits(timeout=3.0))          # one program
    outcomes = run_programs(sources, Limits(), workers=4)         # many, a few at a time
    outcome.status   # "passed" | "failed" | "timed out" | "crashed";  outcome.reason: one line

"passed" means the program ran to its end without raising (InstructEval's rule: `exec` of the
program returned); "failed" that it raised (any BaseException, SystemExit included), with the
exception as the reason; "timed out" that it ran past `timeout` seconds of wall-clock time; "crashed"
that its process ended without a verdict (a signal, a CPU or file-size limit, `os._exit`).

How a program is contained: a child process (`sandbox_child.py`, run as `python -I -S -B`; stdlib
only) in a new session with stdin from /dev/null, stdout and stderr to one pipe that the parent drains
continuously and keeps only the first `output_bytes` of, a minimal environment, and rlimits on address
space (`memory_bytes`), CPU seconds, file size, open files, core dumps and processes + threads. What
else holds depends on what the kernel allows, strongest first (`Outcome.isolation` names it):

- as root (this repository's CI, most GPU boxes): new mount, network, PID and IPC namespaces. The file
  system is the machine's, read-only, with /run, the caller's home (/root) and any directory others
  may not enter hidden (only the interpreter's own files are bound back), a /dev of its own (null,
  zero, full, random, urandom, tty: no GPU, fuse or kvm device); /tmp and /dev/shm are
  private tmpfs of at most `disk_bytes` each, and the program's directory (cwd, HOME, TMPDIR) is in
  that /tmp, so nothing it writes outlives it. No network at all, loopback included; it sees and can
  signal only its own processes, and when it ends or is killed the kernel kills everything it started.
  It runs as a uid of its own (one per worker slot) with no capabilities at all (effective, permitted,
  inheritable, ambient, bounding), no_new_privs, and a seccomp filter (`sandbox_seccomp`: no sockets,
  ptrace, mount, unshare, keyrings, bpf, ...). `STRONGEST` is this mode's isolation string;
- as an ordinary user, where user namespaces are allowed: the same, but the program keeps the
  caller's uid, so it can read what the caller can (outside the caller's home, hidden), and its
  process limit counts the caller's processes too;
- with no namespaces (a container without CAP_SYS_ADMIN, user namespaces off): no capabilities (as
  root a uid of its own, where the interpreter is readable by others, else root's CAP_DAC_READ_SEARCH
  is kept and the isolation says so), seccomp refusing sockets, any new process and any signal to
  another process, and a Python audit hook refusing writes outside its directory. The audit hook
  binds only Python code: ctypes gets past it, and the program can read whatever its uid can.
A mode weaker than `STRONGEST` is logged once per process (a warning naming what is missing).

The wall clock starts when the child reports that the program is about to run (so a slow start on a
loaded machine does not eat into the program's `timeout`, as InstructEval times only its `exec`), and
on expiry the whole process group is killed (SIGKILL).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from flacuna_jax.evals import sandbox_child

STRONGEST = "mntns+netns+pidns+ipcns+uid+nocaps+seccomp"  # as root, where the kernel allows all of it
_UID_BASE = 1_500_000_000  # sandbox uids: _UID_BASE + (our pid % 100000) * _MAX_WORKERS + slot
_MAX_WORKERS = 32
_CHILD_MODULES = ("sandbox_fs", "sandbox_privileges", "sandbox_seccomp", "sandbox_child")
# The child's entry: its modules come compiled, as one marshal file (compiling ~1000 lines in every
# child would cost ~15 ms a program, and its bytecode cache may be off, as PYTHONDONTWRITEBYTECODE does)
_CHILD_MAIN = """import marshal, sys
with open(sys.argv[1], "rb") as f:
    modules = marshal.load(f)
for name, path, code in modules:
    module = type(sys)(name)
    module.__file__ = path
    sys.modules[name] = module
    exec(code, module.__dict__)
sys.modules["sandbox_child"].main(sys.argv[2:])
"""
_child_code: bytes | None = None
_log = logging.getLogger(__name__)
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds of the program (InstructEval's default)
    memory_bytes: int = 1 << 30  # RLIMIT_AS of each process
    processes: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox's uid
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write
    open_files: int = 256
    output_bytes: int = 8192  # stdout + stderr kept (the rest is read and dropped)
    startup_timeout: float = 60.0  # to get from exec of the interpreter to the program's first line
    disk_bytes: int = 64 << 20  # each of its private tmpfs (/tmp with its directory, /dev/shm)
    namespaces: bool = True  # mount, network, PID, IPC namespaces if the kernel lets us (else the weak mode)
    drop_privileges: bool = True  # as root: run the program as an unprivileged uid of its own

    def __post_init__(self):
        # a zero would not mean "nothing": to tmpfs, size=0 is no limit at all
        for name in ("timeout", "memory_bytes", "processes", "file_bytes", "open_files", "startup_timeout", "disk_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.output_bytes < 0:
            raise ValueError(f"Limits.output_bytes must be >= 0, got {self.output_bytes!r}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timed out" | "crashed"
    reason: str = ""  # one line: the exception, the signal, the limit
    output: str = ""  # the first Limits.output_bytes of stdout + stderr
    output_bytes: int = 0  # how much it wrote in all
    seconds: float = 0.0  # wall-clock time of the program
    isolation: str = ""  # what held, e.g. STRONGEST or "uid+nocaps+seccomp+audit-hook(files,processes)"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def result(self) -> str:
        """InstructEval's result format, "passed", "timed out", "failed: <reason>" ("crashed: <reason>"),
        with the exception's type in the reason (InstructEval's has only its message)."""
        return self.status if not self.reason else f"{self.status}: {self.reason}"


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_reason(code: int) -> str:
    """Why the child ended: a signal is -N from the program's own process (no namespaces) or 128 + N
    from the outer one that waited for it."""
    signum = -code if code < 0 else code - 128
    if signum > 0 and signum in signal.valid_signals():
        name = signal.Signals(signum).name
        why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": " (killed)"}
        return f"killed by {name}{why.get(name, '')}"
    return f"exited with code {code} before the program finished"


def _warn_once(isolation: str) -> None:
    """A mode weaker than STRONGEST, logged once per process and mode."""
    if isolation == STRONGEST or isolation.startswith("none"):
        return
    with _warned_lock:
        if isolation in _warned:
            return
        _warned.add(isolation)
    missing = [part for part in STRONGEST.split("+") if part not in isolation.split("+")]
    _log.warning("sandbox: programs run with %s, without %s (see flacuna_jax/evals/sandbox.py for what this "
                 "mode does not protect)", isolation, "+".join(missing) or "nothing")


def _child_bundle() -> bytes:
    """The child's modules, compiled once per process (a marshal of (name, path, code) triples)."""
    global _child_code
    if _child_code is None:
        import marshal

        here = os.path.dirname(os.path.abspath(sandbox_child.__file__))
        modules = []
        for name in _CHILD_MODULES:
            path = os.path.join(here, f"{name}.py")
            with open(path, encoding="utf-8") as f:
                modules.append((name, path, compile(f.read(), path, "exec")))
        _child_code = marshal.dumps(modules)
    return _child_code


def run_program(source: str, limits: Limits = Limits(), slot: int = 0) -> Outcome:
    """Runs `source` contained (see the module docstring); never raises for anything the program does.

    `slot` (0 <= slot < 32) picks the sandbox's uid: programs running at the same time must use
    different slots, so that each one's process limit counts its own processes only.
    """
    if not 0 <= slot < _MAX_WORKERS:
        raise ValueError(f"slot must be in [0, {_MAX_WORKERS}), got {slot}")
    uid = _UID_BASE + (os.getpid() % 100_000) * _MAX_WORKERS + slot
    stage = tempfile.mkdtemp(prefix="flacuna-sandbox-")
    workdir = os.path.join(stage, "work")
    read_fd = write_fd = -1
    try:
        os.mkdir(workdir, 0o700)
        program_path = os.path.join(stage, "program.py")
        with open(os.open(program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(source)
        bundle_path = os.path.join(stage, "child.marshal")
        with open(os.open(bundle_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(_child_bundle())
        if os.geteuid() == 0 and limits.drop_privileges:
            os.chown(workdir, uid, uid)
            os.chmod(stage, 0o711)  # the uid may pass through to its dir (program.py stays 0600, ours)
        read_fd, write_fd = os.pipe()
        cfg = dict(dataclasses.asdict(limits), result_fd=write_fd, program_path=program_path, uid=uid,
                   home=os.path.expanduser("~"))
        argv = [str(int(v) if isinstance(v, bool) else v) for v in (cfg[k] for k in sandbox_child.ARGS)]
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _CHILD_MAIN, bundle_path, *argv],
                                cwd=workdir, env=_minimal_env(workdir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        try:
            outcome = _supervise(proc, read_fd, limits)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        _remove_tree(stage)
    _warn_once(outcome.isolation)
    return outcome


class _Capture:
    """stdout + stderr: everything is read (so the program never blocks on a full pipe), the head kept."""

    def __init__(self, limit: int):
        self.kept, self.total, self.limit = bytearray(), 0, limit

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.kept += data[:max(0, self.limit - len(self.kept))]


def _supervise(proc: subprocess.Popen, result_fd: int, limits: Limits) -> Outcome:
    """Drains output and reads the child's reports until a verdict, its exit, or a deadline."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "output")
    sel.register(result_fd, selectors.EVENT_READ, "result")
    output, pending = _Capture(limits.output_bytes), b""
    isolation = ready_at = verdict = None
    started = time.monotonic()
    deadline = started + limits.startup_timeout
    timed_out = False
    while sel.get_map() and verdict is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=left):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
            elif key.data == "output":
                output.add(data)
            else:
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    event, _, detail = line.decode("utf-8", "replace").partition("\t")
                    if event == "ready" and ready_at is None:
                        isolation, ready_at = detail, time.monotonic()
                        deadline = ready_at + limits.timeout
                    elif event in ("passed", "failed"):
                        verdict = (event, detail)
                    elif event == "error":
                        verdict = ("crashed", f"sandbox: {detail}")
    seconds = time.monotonic() - (ready_at or started)
    if verdict is None and not timed_out:  # the child ended without a verdict: how?
        try:
            verdict = ("crashed", _exit_reason(proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        _kill_group(proc)
        verdict = ("timed out", "") if ready_at else (
            "crashed", f"the sandbox did not start within {limits.startup_timeout:g}s")
    _drain(proc, output)
    sel.close()
    return Outcome(verdict[0], verdict[1], output.kept.decode("utf-8", "replace"), output.total,
                   round(seconds, 3), "none (nothing ran)" if isolation is None else isolation)


def _drain(proc: subprocess.Popen, output: _Capture, grace: float = 0.5) -> None:
    """Output still in the pipe (a verdict can overtake it), for at most `grace` seconds."""
    if proc.stdout.closed:
        return
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + grace
        while (left := end - time.monotonic()) > 0 and sel.select(timeout=left):
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                return
            output.add(data)


def _remove_tree(path: str) -> None:
    """rm -r, making dirs the program chmod-ed writable again first (it may have run as our own uid)."""
    def retry(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int = 4) -> list[Outcome]:
    """`run_program` of each source, `workers` at a time (each with its own slot), in input order."""
    if not 1 <= workers <= _MAX_WORKERS:
        raise ValueError(f"workers must be in [1, {_MAX_WORKERS}], got {workers}")
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(s)

    def one(source: str) -> Outcome:
        slot = slots.get()
        try:
            return run_program(source, limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
