"""evals.sandbox: programs that pass, fail, hang, hog, fork, escape or flood are contained and told apart.

Everything destructive these programs attempt targets only this test's own tmp_path. Tests marked
`kernel` need what the sandbox gets as root here (network + PID namespaces and the uid drop); the
audit-hook fallback, which is what an ordinary user gets, is tested everywhere with the kernel
features switched off.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from flacuna_jax.evals import sandbox
from flacuna_jax.evals.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout=1.0)
FALLBACK = Limits(timeout=1.0, namespaces=False, drop_privileges=False)


def _kernel_isolation() -> bool:
    return run_program("pass", FAST).isolation == "netns+pidns+uid"


kernel = pytest.mark.skipif(os.geteuid() != 0 or not _kernel_isolation(),
                            reason="needs root with CAP_SYS_ADMIN (namespaces, uid drop)")


def _sandbox_processes() -> list[int]:
    """Processes owned by a sandbox uid (a leftover of some program)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid >= sandbox._UID_BASE:
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_verdicts_of_ordinary_programs():
    programs = {
        "passes": "x = [i * i for i in range(10)]\nassert x[3] == 9\nprint('ok')",
        "asserts": "assert 1 + 1 == 3, 'arithmetic'",
        "raises": "def f():\n    return 1 / 0\nf()",
        "syntax": "def f(:\n    pass",
        "sys_exit": "import sys\nsys.exit(0)",  # InstructEval: SystemExit is a BaseException -> failed
        "os_exit": "import os\nos._exit(0)",  # no verdict: the process just ended
        "input": "input()",
        "segfault": "import ctypes\nctypes.string_at(0)",
    }
    got = dict(zip(programs, run_programs(list(programs.values()), FAST, workers=4)))
    assert got["passes"].status == "passed" and got["passes"].output == "ok\n" and got["passes"].reason == ""
    assert got["asserts"].result == "failed: AssertionError: arithmetic"
    assert got["raises"].result == "failed: ZeroDivisionError: division by zero"
    assert got["syntax"].status == "failed" and got["syntax"].reason.startswith("SyntaxError: ")
    assert got["sys_exit"].result == "failed: SystemExit: 0"
    assert got["os_exit"].result == "crashed: exited with code 0 before the program finished"
    assert got["input"].result == "failed: EOFError: EOF when reading a line"
    assert got["segfault"].result == "crashed: killed by SIGSEGV"
    assert [o.passed for o in got.values()] == [True] + [False] * 7


@pytest.mark.parametrize("limits", [FAST, FALLBACK], ids=["kernel", "fallback"])
def test_endless_programs_time_out_on_the_wall_clock(limits):
    start = time.monotonic()
    busy, sleeping, swallowing = run_programs([
        "while True:\n    pass",
        "import time\ntime.sleep(60)",
        "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass",
    ], limits, workers=3)
    assert [busy.status, sleeping.status, swallowing.status] == ["timed out"] * 3
    assert all(1.0 <= o.seconds < 2.0 for o in (busy, sleeping, swallowing))
    assert time.monotonic() - start < 6.0


def test_memory_is_limited():
    limits = Limits(timeout=3.0, memory_bytes=256 << 20)
    hog, growing, small = run_programs(["x = bytearray(8 << 30)",
                                        "x = []\nwhile True:\n    x.append(bytearray(1 << 22))",
                                        "x = bytearray(64 << 20)\nassert len(x) == 64 << 20"], limits, workers=3)
    assert hog.result == "failed: MemoryError:" and growing.result == "failed: MemoryError:"
    assert small.passed


def test_output_is_bounded_and_drained():
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", Limits(timeout=1.0, output_bytes=1000))
    assert flood.status == "timed out" and flood.output == "x" * 1000 and flood.output_bytes > 1_000_000
    # a program that prints a lot and then ends is not held up by the pipe (InstructEval swallows output)
    loud = run_program("print('y' * 5_000_000)\nimport sys\nprint('err', file=sys.stderr)", Limits(output_bytes=10))
    assert loud.passed and loud.output == "y" * 10 and loud.output_bytes == 5_000_001 + 4


def test_working_directory_and_environment():
    out = run_program("import os, sys\nopen('scratch.txt', 'w').write('x')\n"
                      "print(os.getcwd())\nprint(sorted(os.environ))\nprint(os.environ['HOME'])", FAST)
    assert out.passed, out.result
    cwd, env, home = out.output.splitlines()
    assert home == cwd and os.path.basename(cwd) == "work"
    assert eval(env) == ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"]
    assert not os.path.exists(os.path.dirname(cwd))  # the whole stage is gone


def _escape_programs(victim_dir) -> list[str]:
    victim, planted = victim_dir / "keep.txt", victim_dir / "planted.txt"
    return [f"import os\nos.remove({str(victim)!r})",
            f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
            f"open({str(planted)!r}, 'w').write('x')",
            f"import os\nos.rename({str(victim)!r}, {str(victim) + '.moved'!r})",
            f"open({str(victim)!r}, 'a').write('more')"]


@pytest.mark.parametrize("limits", [
    pytest.param(FAST, marks=kernel, id="kernel"), pytest.param(FALLBACK, id="fallback")])
def test_files_outside_its_directory_are_safe(tmp_path, limits):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    outcomes = run_programs(_escape_programs(victim_dir), limits, workers=2)
    assert [o.status for o in outcomes] == ["failed"] * 5, [o.result for o in outcomes]
    assert all("PermissionError" in o.reason for o in outcomes), [o.result for o in outcomes]
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    assert (victim_dir / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("limits", [
    pytest.param(FAST, marks=kernel, id="kernel"), pytest.param(FALLBACK, id="fallback")])
def test_no_network_not_even_our_loopback(limits):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        out = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')",
                          limits)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody reached us
    assert out.status == "failed" and ("OSError" in out.reason or "PermissionError" in out.reason), out.result
    if limits.namespaces:  # a new network namespace has no interface up, loopback included
        assert out.isolation.startswith("netns") and out.reason == "OSError: [Errno 101] Network is unreachable"
    else:
        assert out.reason == "PermissionError: sandbox: socket.getaddrinfo refused"


@kernel
def test_fork_bomb_is_bounded_and_nothing_outlives_the_program():
    bomb = run_program("import os\nwhile True:\n    os.fork()", Limits(timeout=2.0, processes=8))
    assert bomb.status == "failed" and "BlockingIOError" in bomb.reason, bomb.result
    # descendants the program leaves behind (even in a new session) die with it
    orphans = run_program("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                          "time.sleep(0.2)", FAST)
    assert orphans.passed, orphans.result
    time.sleep(0.2)
    assert _sandbox_processes() == []


@kernel
def test_it_cannot_signal_our_processes():
    out = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)", FAST)
    assert out.status == "failed" and "ProcessLookupError" in out.reason  # in its own PID namespace


def test_fallback_refuses_subprocesses():
    out = run_program("import subprocess\nsubprocess.run(['true'])", FALLBACK)
    assert out.result == "failed: PermissionError: sandbox: subprocess.Popen refused"
    assert out.isolation == "audit-hook(network,files)"


def test_a_forked_child_cannot_give_the_verdict():
    # the child runs the rest of the program and succeeds; the program itself then fails
    out = run_program("import os, time\nif os.fork() != 0:\n    time.sleep(0.3)\n    raise ValueError('parent')", FAST)
    assert out.result == "failed: ValueError: parent"


def test_run_programs_keeps_input_order_and_checks_arguments():
    outs = run_programs([f"assert {i} % 2 == 0" for i in range(6)], FAST, workers=3)
    assert [o.passed for o in outs] == [True, False, True, False, True, False]
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], FAST, workers=0)
    with pytest.raises(ValueError, match="slot"):
        run_program("pass", FAST, slot=32)
