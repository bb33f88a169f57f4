"""evals.sandbox against hostile programs, each asserted contained under the strongest mode (root here).

Every attempt is made for real and reported by the program itself (`attempt` in PRELUDE), and where
it would leave a trace on the machine, the trace is looked for afterwards. The targets are this
test's own files (a world-writable directory the program can see, a root-only file in it), our
own process, servers we start on 127.0.0.1 and AF_UNIX, and the kernel's interfaces. The non-root
modes are tested in tests/test_sandbox.py (`test_as_an_ordinary_user_*`).
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from flacuna_jax.evals import sandbox_fs, sandbox_seccomp
from flacuna_jax.evals.sandbox import STRONGEST, Limits, run_programs
from tests.sandbox_helpers import (PRELUDE, attempts, make_visible_dir, remove_visible_dir, sandbox_processes,
                                   strongest_available, wait_until_gone)

pytestmark = pytest.mark.skipif(not strongest_available(),
                                reason=f"needs the sandbox's strongest mode ({STRONGEST}): root and namespaces")
QUICK = Limits(timeout=20.0)  # these programs end by themselves; the timeout only bounds a hang


@pytest.fixture
def visible(tmp_path):
    """A world-writable directory the program sees, holding a world-writable file, a root-only file
    and a root-only directory."""
    path = make_visible_dir()
    (path / "keep.txt").write_text("precious")
    (path / "keep.txt").chmod(0o666)
    (path / "secret.txt").write_text("s3cret")
    (path / "secret.txt").chmod(0o600)
    (path / "closed").mkdir(0o700)
    (path / "closed" / "inner.txt").write_text("inner")
    yield path
    remove_visible_dir(path)


def _assert_untouched(visible) -> None:
    assert sorted(p.name for p in visible.iterdir()) == ["closed", "keep.txt", "secret.txt"]
    assert (visible / "keep.txt").read_text() == "precious" and (visible / "keep.txt").stat().st_nlink == 1
    assert (visible / "keep.txt").stat().st_mode & 0o777 == 0o666


def test_it_reads_no_secret_and_sees_none_of_our_processes(visible):
    home = os.path.realpath(os.path.expanduser("~"))
    os.environ["FLACUNA_SANDBOX_CANARY"] = "canary"  # in our environment, which the program must not reach
    try:
        out, = run_programs([PRELUDE + f"""
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("root_only_file", lambda: open({str(visible / 'secret.txt')!r}).read())
attempt("root_only_dir", lambda: open({str(visible / 'closed' / 'inner.txt')!r}).read())
attempt("our_environ", lambda: open("/proc/{os.getpid()}/environ").read())
attempt("init_environ", lambda: open("/proc/1/environ").read())
attempt("init_memory", lambda: open("/proc/1/mem", "rb").read(1))
attempt("home", lambda: sorted(os.listdir({home!r})))
attempt("processes", lambda: sorted(p for p in os.listdir("/proc") if p.isdigit()))
attempt("environment", lambda: "canary" in str(os.environ) or "canary" in open("/proc/self/environ").read())
attempt("devices", lambda: sorted(os.listdir("/dev")))
attempt("dev_null", lambda: open("/dev/null", "w").write("x") + len(open("/dev/urandom", "rb").read(4)))
"""], QUICK)
    finally:
        del os.environ["FLACUNA_SANDBOX_CANARY"]
    assert out.passed and out.isolation == STRONGEST, out.result
    got = attempts(out.output)
    assert got["root_only_file"] == got["root_only_dir"] == got["init_environ"] == got["init_memory"] == (
        "refused", "EACCES")
    assert got["shadow"] == (("refused", "EACCES") if os.path.exists("/etc/shadow") else ("refused", "ENOENT"))
    assert got["our_environ"] == ("refused", "ENOENT")  # our PID does not exist in its namespace
    assert got["processes"] == ("ok", "['1', '2']")  # its init and itself
    assert got["environment"] == ("ok", "False")
    # a /dev of its own: no GPU, fuse, kvm, disk or console device of ours, only what programs use
    assert eval(got["devices"][1]) == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "tty",
                                       "urandom", "zero"]
    assert got["dev_null"] == ("ok", "5")
    # our home shows only the way to the interpreter, bound back; nothing else of it exists there
    way_in = {p[len(home) + 1:].split("/")[0] for p in sandbox_fs.interpreter_paths() if p.startswith(home + "/")}
    seen = eval(got["home"][1]) if got["home"][0] == "ok" else []
    assert set(seen) <= way_in, (seen, way_in)


@pytest.fixture
def stray_name():
    """A name the program tries to create in shared places; whatever a regression lets through is removed."""
    name = f"flacuna-sandbox-test-{uuid.uuid4().hex}"
    yield name
    home = os.path.realpath(os.path.expanduser("~"))
    for place in ("/tmp", "/dev/shm", "/var/tmp", "/dev", home):
        try:
            os.remove(os.path.join(place, name))
        except OSError:
            pass


def test_it_writes_nowhere_but_its_own_directory_and_private_tmp(visible, stray_name):
    home = os.path.realpath(os.path.expanduser("~"))
    name = stray_name
    keep = str(visible / "keep.txt")
    out, = run_programs([PRELUDE + f"""
attempt("own_dir", lambda: open("mine.txt", "w").write("x"))
attempt("tmp", lambda: open("/tmp/{name}", "w").write("x"))
attempt("dev_shm", lambda: open("/dev/shm/{name}", "w").write("x"))
attempt("var_tmp", lambda: open("/var/tmp/{name}", "w").write("x"))
attempt("visible_new", lambda: open({str(visible / 'planted.txt')!r}, "w").write("x"))
attempt("visible_append", lambda: open({keep!r}, "a").write("more"))
attempt("visible_remove", lambda: os.remove({keep!r}))
attempt("visible_rename", lambda: os.rename({keep!r}, {keep + '.moved'!r}))
attempt("visible_chmod", lambda: os.chmod({keep!r}, 0o777))
attempt("home", lambda: open({home + '/' + name!r}, "w").write("x"))
attempt("dev", lambda: open("/dev/{name}", "w").write("x"))
attempt("proc_sys", lambda: open("/proc/sys/kernel/hostname", "w").write("x"))
os.symlink({keep!r}, "link")
attempt("through_symlink", lambda: open("link", "a").write("more"))
attempt("hard_link", lambda: os.link({keep!r}, "hard"))
attempt("hard_link_write", lambda: os.write(os.open("hard", os.O_WRONLY | os.O_APPEND), b"more"))
"""], QUICK)
    assert out.passed, out.result
    got = attempts(out.output)
    assert got["own_dir"] == got["tmp"] == got["dev_shm"] == ("ok", "1")  # private, and gone afterwards:
    assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/dev/shm/{name}")
    for key in ("var_tmp", "visible_new", "visible_append", "visible_remove", "visible_rename", "visible_chmod",
                "home", "dev", "proc_sys", "through_symlink"):
        assert got[key] == ("refused", "EROFS"), (key, got[key])
    assert got["hard_link"][0] == "refused" and got["hard_link_write"] == ("refused", "ENOENT")
    _assert_untouched(visible)
    assert not os.path.exists(f"/var/tmp/{name}") and not os.path.exists(f"{home}/{name}")


def test_it_cannot_reach_signal_or_trace_other_processes():
    out, = run_programs([PRELUDE + f"""
import signal
attempt("kill_us", lambda: os.kill({os.getpid()}, signal.SIGKILL))
attempt("kill_init", lambda: os.kill(1, signal.SIGKILL))
attempt("kill_all", lambda: os.kill(-1, signal.SIGKILL))
attempt("ptrace_init", lambda: call(libc.ptrace, 16, 1, None, None))  # PTRACE_ATTACH
attempt("ptrace_me", lambda: call(libc.ptrace, 0, 0, None, None))  # PTRACE_TRACEME
buf = ctypes.create_string_buffer(8)
class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
iov = Iov(ctypes.cast(buf, ctypes.c_void_p), 8)
attempt("read_init_memory", lambda: call(libc.process_vm_readv, 1, ctypes.byref(iov), 1, ctypes.byref(iov), 1, 0))
attempt("pidfd_us", lambda: call(libc.syscall, 434, {os.getpid()}, 0))  # pidfd_open
"""], QUICK)
    assert out.passed, out.result
    got = attempts(out.output)
    assert got["kill_us"] == ("refused", "ESRCH") and got["pidfd_us"] == ("refused", "ESRCH")  # not in its namespace
    assert got["kill_init"] == ("refused", "EPERM")
    assert got["kill_all"] == ("refused", "ESRCH")  # nothing it may signal but itself
    assert got["ptrace_init"] == got["ptrace_me"] == got["read_init_memory"] == ("refused", "EPERM")


def test_it_holds_no_capability_and_cannot_gain_one_mount_or_unshare():
    mount_binary = next((p for p in ("/usr/bin/mount", "/bin/mount") if os.path.exists(p)), None)
    machine = os.uname().machine
    nr = dict(sandbox_seccomp.denied_numbers(machine), clone=sandbox_seccomp._CLONE[machine != "x86_64"])
    out, = run_programs([PRELUDE + f"""
NR = {nr!r}
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
attempt("status", lambda: {{k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}})
attempt("setuid_0", lambda: os.setuid(0))
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
everything = (Data * 2)(Data(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), Data(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF))
attempt("capset_all", lambda: call(libc.capset, ctypes.byref(Header(0x20080522, 0)), everything))
attempt("ambient_raise", lambda: call(libc.prctl, 47, 2, 21, 0, 0))  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
attempt("mount_tmpfs", lambda: call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None))
attempt("umount_root", lambda: call(libc.umount2, b"/", 2))
attempt("unshare_user", lambda: call(libc.unshare, 0x10000000))
attempt("unshare_mount", lambda: call(libc.unshare, 0x00020000))
attempt("setns", lambda: call(libc.setns, os.open("/proc/self/ns/net", os.O_RDONLY), 0))
attempt("chroot", lambda: call(libc.chroot, b"."))
def clone_new_user():
    pid = call(libc.syscall, NR["clone"], 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid == 0:
        os._exit(0)
    return pid
attempt("clone_new_user", clone_new_user)
attempt("keyctl", lambda: call(libc.syscall, NR["keyctl"], 0, -3, 0, 0, 0))  # KEYCTL_GET_KEYRING_ID of the session
attempt("add_key", lambda: call(libc.syscall, NR["add_key"], b"user", b"x", b"y", 1, -3))
attempt("bpf", lambda: call(libc.syscall, NR["bpf"], 0, None, 0))
attempt("perf_event_open", lambda: call(libc.syscall, NR["perf_event_open"], None, 0, -1, -1, 0))
attempt("io_uring_setup", lambda: call(libc.syscall, NR["io_uring_setup"], 1, ctypes.create_string_buffer(120)))
attempt("userfaultfd", lambda: call(libc.syscall, NR["userfaultfd"], 0))
if {mount_binary!r}:
    import subprocess
    run = subprocess.run([{mount_binary!r}, "-t", "tmpfs", "none", "/mnt"], capture_output=True)
    attempt("setuid_root_mount_binary", lambda: (run.returncode, os.path.ismount("/mnt")))
"""], QUICK)
    assert out.passed, out.result
    got = attempts(out.output)
    assert eval(got["status"][1]) == {"CapInh": "0000000000000000", "CapPrm": "0000000000000000",
                                      "CapEff": "0000000000000000", "CapBnd": "0000000000000000",
                                      "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    for key in ("setuid_0", "capset_all", "ambient_raise", "mount_tmpfs", "umount_root", "unshare_user", "unshare_mount",
                "setns", "chroot", "clone_new_user", "keyctl", "add_key", "bpf", "perf_event_open", "io_uring_setup",
                "userfaultfd"):
        assert got[key] == ("refused", "EPERM"), (key, got[key])
    if mount_binary:  # set-uid root, yet it runs as the program's uid: mount refuses, nothing mounted
        code, mounted = eval(got["setuid_root_mount_binary"][1])
        assert code != 0 and mounted is False


def test_no_network_in_any_form(visible):
    abstract = f"\0flacuna-sandbox-test-{uuid.uuid4().hex}"
    path = str(visible / "server.sock")
    servers = {"tcp": socket.socket(), "tcp6": socket.socket(socket.AF_INET6), "unix": socket.socket(socket.AF_UNIX),
               "abstract": socket.socket(socket.AF_UNIX), "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM)}
    try:
        servers["tcp"].bind(("127.0.0.1", 0))
        servers["tcp6"].bind(("::1", 0))
        servers["unix"].bind(path)
        os.chmod(path, 0o777)  # anyone may connect: only the sandbox can stop it
        servers["abstract"].bind(abstract)
        servers["udp"].bind(("127.0.0.1", 0))
        for s in servers.values():
            s.settimeout(0.01)  # the program has ended by then: a connection would be queued already
            if s.type == socket.SOCK_STREAM:
                s.listen()
        out, = run_programs([PRELUDE + f"""
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {servers['tcp'].getsockname()[1]}), timeout=2))
attempt("tcp6", lambda: socket.create_connection(("::1", {servers['tcp6'].getsockname()[1]}), timeout=2))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hi", ("127.0.0.1", {servers['udp'].getsockname()[1]})))
attempt("unix_path", lambda: socket.socket(socket.AF_UNIX).connect({path!r}))
attempt("unix_abstract", lambda: socket.socket(socket.AF_UNIX).connect({abstract!r}))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("raw_syscall", lambda: call(libc.socket, 2, 1, 0))
try:
    socket.getaddrinfo("example.com", 80)
    print(json.dumps(["dns", "ok", ""]))
except OSError as e:
    print(json.dumps(["dns", "refused", type(e).__name__]))
a, b = socket.socketpair()  # an already connected pair: no address, no network
a.send(b"ping")
attempt("socketpair", lambda: b.recv(4))
"""], QUICK)
        for name in ("tcp", "tcp6", "unix", "abstract"):
            with pytest.raises(socket.timeout):
                servers[name].accept()  # nobody reached us
        with pytest.raises(socket.timeout):
            servers["udp"].recvfrom(16)
    finally:
        for s in servers.values():
            s.close()
    assert out.passed, out.result
    got = attempts(out.output)
    for key in ("tcp", "tcp6", "udp", "unix_path", "unix_abstract", "netlink", "packet", "raw_syscall"):
        assert got[key] == ("refused", "EPERM"), (key, got[key])
    assert got["dns"] == ("refused", "gaierror") and got["socketpair"] == ("ok", "b'ping'")


def test_nothing_keeps_running_after_the_deadline():
    daemon = """import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            time.sleep(0.05)
    os._exit(0)
while True:
    pass
"""
    hidden = daemon.replace("while True:\n    pass", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)")
    outs = run_programs([daemon, hidden], Limits(timeout=1.0), workers=2)
    assert [o.status for o in outs] == ["timed out"] * 2, [o.result for o in outs]
    assert all(o.seconds >= 1.0 for o in outs)  # killed at the deadline, not before
    assert wait_until_gone(sandbox_processes) == []


def test_disk_processes_threads_and_files_are_bounded():
    limits = Limits(timeout=20.0, disk_bytes=8 << 20, file_bytes=4 << 20, processes=8, open_files=64)
    disk = PRELUDE + """
def fill(directory):
    total = 0
    try:
        for i in range(1000):
            with open(f"{directory}/fill{i}", "wb") as f:
                for _ in range(4):
                    f.write(b"x" * (1 << 20))
                    total += 1 << 20
    except OSError as e:
        return total, errno.errorcode[e.errno]
attempt("cwd", lambda: fill("."))
attempt("dev_shm", lambda: fill("/dev/shm"))
def inodes():
    i = 0
    try:
        while True:
            os.mkdir(f"/tmp/d{i}")
            i += 1
    except OSError as e:
        return i, errno.errorcode[e.errno]
import shutil
for name in os.listdir("."):
    os.remove(name)
attempt("inodes", inodes)
"""
    threads = """import threading, time
for _ in range(100):
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
"""
    files = PRELUDE + """
opened = []
def exhaust():
    while True:
        opened.append(os.open("/dev/null", os.O_RDONLY))
attempt("files", exhaust)
print(len(opened))
"""
    disk_out, threads_out, files_out = run_programs([disk, threads, files], limits, workers=3)
    got = attempts(disk_out.output)
    assert disk_out.passed, disk_out.result
    for key in ("cwd", "dev_shm"):  # the tmpfs is full at 8 MiB (less what its directories take)
        written, error = eval(got[key][1])
        assert error == "ENOSPC" and (8 << 20) - (1 << 20) <= written <= 8 << 20, (key, got[key])
    made, error = eval(got["inodes"][1])
    assert error == "ENOSPC" and 0 < made <= 64 * 64, got["inodes"]  # the inode limit: 64 per MiB, at least 64
    assert threads_out.result == "failed: RuntimeError: can't start new thread"
    assert attempts(files_out.output)["files"] == ("refused", "EMFILE") and int(files_out.output.split()[-1]) <= 64
