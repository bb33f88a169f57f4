"""The one place in flacuna_jax that executes model output: a Python program in a contained subprocess.

    outcome = run_program(source, Limits(timeout=3.0))          # one program
    outcomes = run_programs(sources, Limits(), workers=4)         # many, a few at a time
    outcome.status   # "passed" | "failed" | "timed out" | "crashed";  outcome.reason: one line

"passed" means the program ran to its end without raising (InstructEval's rule: `exec` of the
program returned); "failed" that it raised (any BaseException, SystemExit included), with the
exception as the reason; "timed out" that it ran past `timeout` seconds of wall-clock time; "crashed"
that its process ended without a verdict (a signal, a CPU or file-size limit, `os._exit`).

How a program is contained. This file is also the child's entry point (`python -I -S -B
sandbox.py --child ...`; stdlib only, so the child imports nothing of the project). The child:

- runs in a new session (process group) with stdin from /dev/null, stdout and stderr to one pipe that
  the parent drains continuously and keeps only the first `output_bytes` of, and a minimal environment;
- works in its own temporary directory (cwd, HOME, TMPDIR), removed afterwards;
- enters new network and PID namespaces (`unshare(2)`, needs CAP_SYS_ADMIN, e.g. root): no network at
  all (not even loopback); a PID 1 of ours runs the program (as PID 2, so signals reach it as anywhere)
  and dies when the child's outer process does (PR_SET_PDEATHSIG), and with PID 1 the kernel kills
  every process in the namespace: nothing the program starts outlives it;
- when started as root, drops to an unprivileged uid of its own (one per worker slot), keeping only
  CAP_DAC_READ_SEARCH so it can still read the interpreter's files wherever they are installed (here
  under /root): it can write nothing but its own directory (and world-writable dirs such as /tmp), can
  signal none of our processes, and gains no privileges through exec (PR_SET_NO_NEW_PRIVS);
- sets rlimits: address space (`memory_bytes`), CPU seconds, file size, open files, no core dumps, and
  processes + threads (RLIMIT_NPROC, enforced only for a non-root uid, hence the uid drop);
- where a namespace or the uid drop is not available (no CAP_SYS_ADMIN, not root) it falls back to a
  Python audit hook installed before the program runs: without the network namespace it refuses
  sockets and subprocesses; without the uid drop it refuses writing, deleting, renaming and
  chmod outside its directory. An audit hook binds only Python code in that process, so this is a
  weaker guard; `Outcome.isolation` says which protections were in effect.

The wall clock starts when the child reports that the program is about to run (so a slow start on a
loaded machine does not eat into the program's `timeout`, as InstructEval times only its `exec`), and
on expiry the whole process group is killed (SIGKILL).
"""

from __future__ import annotations

import os
import sys

_CLONE_NEWNET, _CLONE_NEWPID = 0x40000000, 0x20000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 1, 8, 38
_CAP_DAC_READ_SEARCH = 2
_SIGKILL = 9
# The child's settings, passed as argv in this order (no json in the child: it would cost 40 ms a run).
_CHILD_ARGS = ("result_fd", "program_path", "uid", "timeout", "memory_bytes", "processes", "file_bytes",
               "open_files", "namespaces", "drop_privileges")
_UID_BASE = 1_500_000_000  # sandbox uids: _UID_BASE + (our pid % 100000) * _MAX_WORKERS + slot
_MAX_WORKERS = 32


# ------------------------------------------------------------------------------ the child

def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    _, libc = _libc()
    return libc.unshare(flags) == 0


def _drop_privileges(uid: int) -> None:
    """setresuid/gid to `uid`, keeping only CAP_DAC_READ_SEARCH (if we had it), no new privileges."""
    ctypes, libc = _libc()

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0 or libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "capget/prctl failed")
    kept = data[0].permitted & (1 << _CAP_DAC_READ_SEARCH)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    data[0].effective = data[0].permitted = kept
    data[0].inheritable = data[1].effective = data[1].permitted = data[1].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0 or libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "capset/prctl failed")


def _set_limits(cfg: dict) -> None:
    import resource

    cpu = int(cfg["timeout"]) + 2
    for which, value in ((resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, cfg["open_files"]),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["processes"])):
        resource.setrlimit(which, (value, value))


def _processes_of(uid: int) -> int:
    """Processes and threads of `uid` now (from /proc)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _install_guard(workdir: str, network: bool, files: bool) -> None:
    """The fallback: an audit hook refusing what the kernel could not be made to refuse."""
    root = os.path.realpath(workdir) + os.sep
    spawn = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn")
    changes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
               "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile")

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # an fd: its opening was checked
        return not os.path.realpath(os.fsdecode(path)).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if network and (event.startswith("socket.") or event in spawn):
            raise PermissionError(f"sandbox: {event} refused")
        if files and event == "open" and args[0] is not None and outside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(f"sandbox: writing {args[0]!r} refused")
        if files and event in changes and args and outside(args[0]):
            raise PermissionError(f"sandbox: {event} {args[0]!r} refused")

    sys.addaudithook(hook)


def _run_in_namespace(program, cfg: dict, report) -> None:
    """Limits, guards, then the program: reports 'ready' and the verdict on the result pipe."""
    dropped = False
    if cfg["drop_privileges"] and os.geteuid() == 0:
        try:
            _drop_privileges(cfg["uid"])
            dropped = True
        except OSError:  # e.g. a container without CAP_SETUID: the audit-hook guard stands in (and says so)
            pass
    if not dropped and os.geteuid() != 0:  # RLIMIT_NPROC counts all of this uid's processes
        cfg = dict(cfg, processes=cfg["processes"] + _processes_of(os.getuid()))
    _set_limits(cfg)
    if not (cfg["isolated_net"] and dropped):
        _install_guard(os.getcwd(), network=not cfg["isolated_net"], files=not dropped)
    report("ready", "uid" if dropped else "")
    me = os.getpid()
    try:
        exec(program, {})  # an empty namespace, as InstructEval's exec_globals
        verdict = ("passed", "")
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail a program too
        verdict = ("failed", f"{type(e).__name__}: {e}")
    if os.getpid() != me:  # a process the program forked got here: only the program's own verdict counts
        os._exit(0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have closed or replaced it
            pass
    report(*verdict)
    os._exit(0)


def _child_main(argv: list[str]) -> None:
    import site  # -S skipped it (its .pth files cost ~0.1 s a program); the packages stay importable

    sys.path.extend(p for p in site.getsitepackages() if p not in sys.path)
    cfg = {key: (value if key == "program_path" else int(float(value)) if key == "timeout" else int(value))
           for key, value in zip(_CHILD_ARGS, argv)}
    fd = cfg["result_fd"]

    def report(event: str, detail: str = "") -> None:
        """One line on the result pipe: an event ('namespaces', 'ready' or a status) and one-line detail."""
        os.write(fd, f"{event}\t{' '.join(detail.split())[:300]}\n".encode("utf-8", "replace"))

    with open(cfg["program_path"], encoding="utf-8") as f:
        source = f.read()
    try:
        program_code = compile(source, "program.py", "exec")
    except BaseException as e:  # noqa: BLE001 - a syntax error is the program's failure
        report("ready")
        report("failed", f"{type(e).__name__}: {e}")
        return
    isolated = bool(cfg["namespaces"]) and _unshare(_CLONE_NEWNET | _CLONE_NEWPID)
    cfg["isolated_net"] = isolated
    report("namespaces", "netns+pidns" if isolated else "")
    if not isolated:
        _run_in_namespace(program_code, cfg, report)
    init = os.fork()  # PID 1 of the new namespace: when it dies the kernel kills everything in it
    if init == 0:  # (should we die before the death signal is armed, the parent's killpg reaches it)
        _, libc = _libc()
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        program = os.fork()  # the program is PID 2, so signals reach it as they would anywhere
        if program == 0:
            _run_in_namespace(program_code, cfg, report)
        _exit_as(program, fd)
    _exit_as(init, fd)


def _exit_as(pid: int, fd: int) -> None:
    """Waits for child `pid` and exits as it did (a signal as 128 + its number)."""
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(sys.argv[2:])
    sys.exit(0)


# ------------------------------------------------------------------------------ the parent

import dataclasses  # noqa: E402 - the child above needs none of this
import signal  # noqa: E402
import queue  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Sequence  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds of the program (InstructEval's default)
    memory_bytes: int = 1 << 30  # RLIMIT_AS of each process
    processes: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox's uid
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write
    open_files: int = 256
    output_bytes: int = 8192  # stdout + stderr kept (the rest is read and dropped)
    startup_timeout: float = 60.0  # to get from exec of the interpreter to the program's first line
    namespaces: bool = True  # network + PID namespaces if the kernel lets us (else the audit-hook guard)
    drop_privileges: bool = True  # as root: run the program as an unprivileged uid


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timed out" | "crashed"
    reason: str = ""  # one line: the exception, the signal, the limit
    output: str = ""  # the first Limits.output_bytes of stdout + stderr
    output_bytes: int = 0  # how much it wrote in all
    seconds: float = 0.0  # wall-clock time of the program
    isolation: str = ""  # e.g. "netns+pidns+uid" or "audit-hook(network,files)"

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
    if code > 128 and code - 128 in signal.valid_signals():
        name = signal.Signals(code - 128).name
        why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": " (killed)"}
        return f"killed by {name}{why.get(name, '')}"
    return f"exited with code {code} before the program finished"


def _isolation(namespaces: bool | None, uid_dropped: bool | None) -> str:
    if namespaces is None:
        return "none (nothing ran)"
    kernel = (["netns", "pidns"] if namespaces else []) + (["uid"] if uid_dropped else [])
    hooked = ([] if namespaces else ["network"]) + ([] if uid_dropped else ["files"])
    return "+".join(kernel + ([f"audit-hook({','.join(hooked)})"] if hooked else []))


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
        if os.geteuid() == 0 and limits.drop_privileges:
            os.chown(workdir, uid, uid)
            os.chmod(stage, 0o711)  # the uid may pass through to its dir (program.py stays 0600, ours)
        read_fd, write_fd = os.pipe()
        cfg = dict(dataclasses.asdict(limits), result_fd=write_fd, program_path=program_path, uid=uid)
        argv = [str(int(v) if isinstance(v, bool) else v) for v in (cfg[k] for k in _CHILD_ARGS)]
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--child", *argv],
                                cwd=workdir, env=_minimal_env(workdir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        try:
            return _supervise(proc, read_fd, limits)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        _remove_tree(stage)


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
    namespaces = uid_dropped = ready_at = verdict = None
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
                    if event == "namespaces":
                        namespaces = bool(detail)
                    elif event == "ready" and ready_at is None:
                        uid_dropped, ready_at = bool(detail), time.monotonic()
                        deadline = ready_at + limits.timeout
                    elif event in ("passed", "failed"):
                        verdict = (event, detail)
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
                   round(seconds, 3), _isolation(namespaces, uid_dropped))


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
