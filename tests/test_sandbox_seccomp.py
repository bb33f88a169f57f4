"""evals.sandbox_seccomp: the system call table is the kernel's, and the filter refuses what it says.

Each check runs in a forked child (a seccomp filter cannot be removed), beside a control child
without the filter, so a refusal is the filter's doing and not a missing privilege.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import threading

import pytest

from flacuna_jax.evals import sandbox_seccomp
from tests.sandbox_helpers import in_forked_child

pytestmark = pytest.mark.skipif(not sandbox_seccomp.supported(), reason="no system call table for this machine")

_HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "/usr/include/asm-generic/unistd.h"}


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_numbers_are_those_of_the_kernel_headers(machine):
    if not os.path.exists(_HEADERS[machine]):
        pytest.skip(f"{_HEADERS[machine]} is not installed (linux-libc-dev)")
    with open(_HEADERS[machine], encoding="utf-8") as f:
        header = dict(re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$", f.read(), re.M))
    column = machine != "x86_64"
    ours = dict(sandbox_seccomp.denied_numbers(machine), clone3=sandbox_seccomp._CLONE3[column],
                clone=sandbox_seccomp._CLONE[column],
                **{name: nrs[column] for name, nrs in {**sandbox_seccomp._SIGNAL_BY_PID,
                                                        **sandbox_seccomp._SIGNAL_OTHERWISE}.items()})
    assert {name: int(header[name]) for name in ours} == ours
    if machine == "x86_64":
        assert (int(header["fork"]), int(header["vfork"])) == sandbox_seccomp._FORKS


def _in_child(filtered: bool, processes: bool = True) -> dict:
    """What a forked child (no_new_privs, then the filter if `filtered`) can do, as {name: result}."""
    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as the sandbox (the filter needs it)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        if filtered:
            sandbox_seccomp.install(processes=processes)
        got = {}

        def attempt(name, fn):
            try:
                got[name] = ["ok", fn()]
            except OSError as e:
                got[name] = ["refused", e.errno]

        def call(*args):
            result = libc.syscall(*args)
            if result == -1:
                raise OSError(ctypes.get_errno(), "")
            return 0

        def fork():
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
            return 0

        numbers = sandbox_seccomp.denied_numbers(os.uname().machine)
        attempt("socket", lambda: socket.socket().close())
        attempt("socketpair", lambda: [s.close() for s in socket.socketpair()] and 0)
        attempt("keyctl", lambda: call(numbers["keyctl"], 0, -3, 0))  # the session keyring's id
        attempt("ptrace", lambda: call(numbers["ptrace"], 3, 0, 0, 0))  # PTRACE_PEEKUSER of no one: ESRCH
        attempt("clone3", lambda: call(sandbox_seccomp._CLONE3[os.uname().machine != "x86_64"], 0, 0))
        attempt("fork", fork)
        thread = threading.Thread(target=lambda: None)
        attempt("thread", lambda: (thread.start(), thread.join()) and 0)
        attempt("signal_self", lambda: os.kill(os.getpid(), 0) or 0)  # signal 0: only whether it may
        attempt("signal_group", lambda: os.kill(0, 0) or 0)
        attempt("signal_parent", lambda: os.kill(os.getppid(), 0) or 0)
        attempt("signal_everyone", lambda: os.kill(-1, 0) or 0)
        attempt("raise", lambda: signal.raise_signal(signal.SIGUSR1) or 0)  # tgkill of our own thread
        attempt("unshare_user", lambda: call(numbers["unshare"], 0x10000000))  # CLONE_NEWUSER; last, as it
        # changes this child's namespaces where it succeeds
        return got

    return in_forked_child(body)


def test_the_filter_refuses_what_an_unfiltered_process_may_do():
    free, filtered, no_processes = _in_child(False), _in_child(True), _in_child(True, processes=False)
    # the control: what an unfiltered process may do here (a container's own filter may refuse some
    # of keyctl, ptrace, clone3 and unshare already; then only the filtered side can be checked)
    for name in ("socket", "socketpair", "fork", "thread"):
        assert free[name][0] == "ok", (name, free[name])  # so the refusals below are the filter's
    if free["ptrace"] != ["refused", 1]:
        assert free["ptrace"] == ["refused", 3]  # ESRCH: ptrace looked for the process
    for name in ("socket", "keyctl", "ptrace"):
        assert filtered[name] == no_processes[name] == ["refused", 1], name  # EPERM
    assert filtered["clone3"] == no_processes["clone3"] == ["refused", 38]  # ENOSYS: the C library falls back to clone
    assert filtered["socketpair"] == filtered["fork"] == filtered["thread"] == ["ok", 0]
    assert no_processes["fork"] == ["refused", 1] and no_processes["thread"] == ["ok", 0]
    signals = ("signal_self", "signal_group", "signal_parent", "signal_everyone", "raise")
    assert [free[k] for k in signals] == [filtered[k] for k in signals] == [["ok", 0]] * 5
    # without new processes (no PID namespace), signals may go to this process only
    assert [no_processes[k] for k in signals] == [["ok", 0], ["ok", 0], ["refused", 1], ["refused", 1], ["ok", 0]]
    assert filtered["unshare_user"] == no_processes["unshare_user"] == ["refused", 1]  # even where, as here, user
    # namespaces are open to anyone (then the control succeeded)


def test_jumps_resolve_within_the_program():
    for machine in ("x86_64", "aarch64"):
        for processes in (True, False):
            code = sandbox_seccomp.program(machine, processes, own_pid=1234)
            assert code[0] == (0x20, 0, 0, 4)  # load the architecture first
            assert code[-1][0] == 0x06  # and every path ends in a return
            for i, (op, jt, jf, _) in enumerate(code):
                if op & 0x07 == 0x05:  # a jump: both targets inside the program
                    assert i + 1 + max(jt, jf) < len(code)
    with pytest.raises(ValueError, match="own_pid"):
        sandbox_seccomp.program("x86_64", processes=False)
