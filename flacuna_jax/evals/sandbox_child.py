"""The sandbox's child: `main(ARGS)` in a fresh `python -I -S -B` contains one program and runs it.

Stdlib only, so the child imports nothing of the project: `evals.sandbox` hands it this module and its
siblings sandbox_fs, sandbox_privileges and sandbox_seccomp compiled, as top-level modules (`python
-S` does not see the project's install), starts it and reads its reports, one line each on the result
pipe: `ready\\t<isolation>` when the program is about to run, then
`passed` or `failed\\t<exception>`, or `error\\t<why>` if the sandbox could not be set up.

The strongest mode, as root: new mount, network, PID and IPC namespaces (`unshare`), the file system
of `sandbox_fs` (read-only, /root and /run hidden, a private size-limited /tmp holding the program's
directory), a uid of its own with no capabilities at all and no_new_privs (`sandbox_privileges`), the
seccomp filter of `sandbox_seccomp`, rlimits. As an ordinary user the same namespaces come from a new
user namespace when the kernel allows one, but the program keeps the caller's uid (it can read what
the caller can, outside the caller's hidden home). With no namespaces at all it runs in this process
with rlimits, no capabilities, seccomp (no sockets, no new processes, signals to itself only) and an
audit hook refusing writes outside its directory from Python code. `Outcome.isolation` names what held, e.g.
"mntns+netns+pidns+ipcns+uid+nocaps+seccomp".
"""

from __future__ import annotations

import os
import sys

ARGS = ("result_fd", "program_path", "uid", "timeout", "memory_bytes", "processes", "file_bytes",
        "open_files", "disk_bytes", "namespaces", "drop_privileges", "home")
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWIPC = 0x00020000, 0x10000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _SIGKILL = 1, 9


def _load_siblings():
    """sandbox_fs, sandbox_privileges, sandbox_seccomp: those handed over (in sys.modules already), else
    from this directory (which leaves sys.path again)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import sandbox_fs
        import sandbox_privileges
        import sandbox_seccomp
    finally:
        while here in sys.path:
            sys.path.remove(here)
    return sandbox_fs, sandbox_privileges, sandbox_seccomp


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _processes_of(uid: int) -> int:
    """Processes and threads of `uid` now (from /proc): RLIMIT_NPROC counts them all."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _set_limits(cfg: dict, processes: int) -> None:
    import resource

    cpu = int(cfg["timeout"]) + 2
    for which, value in ((resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, cfg["open_files"]),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, processes)):
        resource.setrlimit(which, (value, value))


def _install_guard(workdir: str, network: bool, processes: bool) -> str:
    """Without a mount namespace: an audit hook refusing, from Python code, writes outside `workdir`,
    and (`network`, `processes`) sockets and new processes. Returns its isolation label."""
    root = os.path.realpath(workdir) + os.sep
    spawn = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")
    changes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
               "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile")

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # an fd: its opening was checked
        return not os.path.realpath(os.fsdecode(path)).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if (network and event.startswith("socket.")) or (processes and event in spawn):
            raise PermissionError(f"sandbox: {event} refused")
        if event == "open" and args[0] is not None and outside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(f"sandbox: writing {args[0]!r} refused")
        if event in changes and args and outside(args[0]):
            raise PermissionError(f"sandbox: {event} {args[0]!r} refused")

    sys.addaudithook(hook)
    return "audit-hook(" + ",".join(["files"] + (["network"] if network else []) + (["processes"] if processes else [])) + ")"


def _contain(cfg: dict, mode: str | None, workdir: str, processes: int, mods) -> str:
    """This process, about to run the program: privileges, limits, filter, guard. Returns the isolation."""
    sandbox_fs, privileges, seccomp = mods
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    held = {"root": ["mntns", "netns", "pidns", "ipcns"], "userns": ["userns", "mntns", "netns", "pidns", "ipcns"]}
    parts = list(held.get(mode, []))
    if os.geteuid() == 0 and cfg["drop_privileges"]:
        # without our file system view, a uid of its own cannot enter a closed directory on the way to
        # the interpreter (a pyenv under /root): then it keeps CAP_DAC_READ_SEARCH, and says so
        closed = mode is None and any(sandbox_fs.closed_ancestor(p) for p in sandbox_fs.interpreter_paths())
        try:
            privileges.drop(cfg["uid"], keep=(1 << privileges.CAP_DAC_READ_SEARCH) if closed else 0)
            parts.append("uid")
        except OSError:  # e.g. a container without CAP_SETUID: it stays root, without capabilities
            privileges.drop(None)
    else:
        privileges.drop(None)
    parts.append(privileges.describe())
    _set_limits(cfg, processes)
    if seccomp.supported():
        try:
            seccomp.install(processes=mode is not None)
            parts.append("seccomp")
        except OSError:  # a kernel without seccomp filters, or a container's policy refusing one: said so
            pass
    if mode is None:
        parts.append(_install_guard(workdir, network="seccomp" not in parts, processes=True))
    return "+".join(parts)


def _run(program, report, isolation: str) -> None:
    """Reports 'ready', runs the program, reports its verdict, and exits this process."""
    report("ready", isolation)
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


def _enter_namespaces(cfg: dict, mods) -> tuple[str | None, str]:
    """('root' or 'userns', the program's directory) if new namespaces were entered and their file
    system set up; (None, our directory) if the kernel refused them (then nothing changed that
    matters: the weak mode runs in this process)."""
    sandbox_fs, privileges, _ = mods
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
    root = os.geteuid() == 0
    libc = _libc()
    if root:
        if libc.unshare(flags) != 0:
            return None, os.getcwd()
    else:
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(flags | _CLONE_NEWUSER) != 0:
            return None, os.getcwd()
        try:
            privileges.map_own_ids(uid, gid)
        except OSError:
            return None, os.getcwd()
    plan = sandbox_fs.Plan.for_this_interpreter(
        os.path.basename(os.path.dirname(cfg["program_path"])), cfg["uid"] if root and cfg["drop_privileges"] else -1,
        cfg["disk_bytes"], cfg["home"] or None, hide_closed=root)
    try:
        sandbox_fs.make_private()
    except sandbox_fs.SetupError:  # a user namespace without the right to mount (e.g. AppArmor's
        return None, os.getcwd()  # restriction on Ubuntu): nothing has changed yet, the weak mode can run
    sandbox_fs.enter(plan)  # a failure from here on is reported: the namespace is half set up
    return ("root" if root else "userns"), plan.workdir


def main(argv: list[str]) -> None:
    import site  # -S skipped it (its .pth files cost ~0.1 s a program); the packages stay importable

    sys.path.extend(p for p in site.getsitepackages() if p not in sys.path)
    cfg = {key: (value if key in ("program_path", "home") else int(float(value)) if key == "timeout" else int(value))
           for key, value in zip(ARGS, argv)}
    fd = cfg["result_fd"]

    def report(event: str, detail: str = "") -> None:
        """One line on the result pipe: an event and a one-line detail."""
        os.write(fd, f"{event}\t{' '.join(detail.split())[:300]}\n".encode("utf-8", "replace"))

    with open(cfg["program_path"], encoding="utf-8") as f:
        source = f.read()
    try:
        program = compile(source, "program.py", "exec")
    except BaseException as e:  # noqa: BLE001 - a syntax error is the program's failure
        report("ready", "none (nothing ran)")
        report("failed", f"{type(e).__name__}: {e}")
        return
    mods = _load_siblings()
    # RLIMIT_NPROC counts every process of a uid: ours too, when the program keeps our uid
    keeps_uid = not (os.geteuid() == 0 and cfg["drop_privileges"])
    processes = cfg["processes"] + (_processes_of(os.geteuid()) if keeps_uid else 0)
    try:
        mode, workdir = _enter_namespaces(cfg, mods) if cfg["namespaces"] else (None, os.getcwd())
    except OSError as e:
        report("error", f"the sandbox's file system could not be set up: {e}")
        return
    if mode is None:
        try:
            isolation = _contain(cfg, None, workdir, processes, mods)
        except OSError as e:
            report("error", f"the sandbox could not drop privileges: {e}")
            return
        _run(program, report, isolation)
    init = os.fork()  # PID 1 of the new namespace: when it dies the kernel kills everything in it
    if init == 0:  # (should we die before the death signal is armed, the parent's killpg reaches it)
        _libc().prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        try:
            mods[0].mount_proc()
        except OSError as e:
            report("error", f"the sandbox's /proc could not be set up: {e}")
            os._exit(1)
        child = os.fork()  # the program is PID 2, so signals reach it as they would anywhere
        if child == 0:
            try:
                isolation = _contain(cfg, mode, workdir, processes, mods)
            except OSError as e:
                report("error", f"the sandbox could not drop privileges: {e}")
                os._exit(1)
            _run(program, report, isolation)
        _exit_as(child, fd)
    _exit_as(init, fd)


def _exit_as(pid: int, fd: int) -> None:
    """Waits for child `pid` and exits as it did (a signal as 128 + its number)."""
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


