"""evals.sandbox_fs: what gets covered and bound back, and the view it builds in a mount namespace.

The view is built in a forked child that first enters a new mount namespace (root only), so nothing
here changes this machine's mounts; the child reports what it saw as JSON on a pipe.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from flacuna_jax.evals import sandbox_fs
from flacuna_jax.evals.sandbox_fs import Cover, Plan
from tests.sandbox_helpers import in_forked_child, make_visible_dir, remove_visible_dir, strongest_available

as_root = pytest.mark.skipif(not strongest_available(), reason="needs root and mount namespaces")


@pytest.fixture
def tree():
    """base/closed (0700)/inner/needed and base/open/needed: one needed path behind a closed door."""
    base = make_visible_dir()
    (base / "closed" / "inner" / "needed").mkdir(parents=True)
    (base / "closed").chmod(0o700)
    (base / "closed" / "inner" / "needed" / "lib.py").write_text("x = 1")
    (base / "closed" / "other.txt").write_text("not for the program")
    (base / "open" / "needed").mkdir(parents=True)
    (base / "home").mkdir()
    yield base
    remove_visible_dir(base)


def test_closed_ancestor_is_the_topmost_door_others_may_not_pass(tree):
    assert sandbox_fs.closed_ancestor(str(tree / "closed" / "inner" / "needed")) == str(tree / "closed")
    assert sandbox_fs.closed_ancestor(str(tree / "open" / "needed")) is None
    assert sandbox_fs.closed_ancestor("/") is None


def test_plan_covers_tmp_run_home_and_closed_doors_revealing_what_is_needed(tree):
    needed = [str(tree / "closed" / "inner" / "needed"), str(tree / "closed" / "inner" / "needed" / "sub"),
              str(tree / "open" / "needed")]
    covers = {c.path: c for c in sandbox_fs.plan_covers(needed, str(tree / "home"), hide_closed=True)}
    assert covers[str(tree / "closed")] == Cover(str(tree / "closed"), False, (needed[0],))  # nested: once
    assert covers[str(tree / "home")] == Cover(str(tree / "home"), False, ())
    assert covers["/tmp"].writable and covers["/tmp"].reveals == ()
    assert covers["/run"].writable is False
    assert covers["/dev"] == Cover("/dev", False, tuple(f"/dev/{d}" for d in sandbox_fs._DEVICES if os.path.exists(
        f"/dev/{d}")), sandbox_fs._DEV_LINKS + ((("shm", os.readlink("/dev/shm")),) if os.path.islink("/dev/shm") else ()))
    if os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm"):  # writable, inside the new /dev: after it
        order = [c.path for c in sandbox_fs.plan_covers(needed, str(tree / "home"), hide_closed=True)]
        assert order.index("/dev/shm") > order.index("/dev") and covers["/dev/shm"].writable
    assert str(tree / "open") not in covers and str(tree / "open" / "needed") not in covers
    as_user = {c.path for c in sandbox_fs.plan_covers(needed, str(tree / "home"), hide_closed=False)}
    assert str(tree / "closed") not in as_user  # an ordinary user cannot pass that door anyway
    # a needed path under /tmp (a venv there) is bound back into the private /tmp; covers nest once
    inside = sandbox_fs.plan_covers(["/tmp/venv/lib"], "/tmp/home", hide_closed=False)
    assert [c for c in inside if c.path == "/tmp"] == [Cover("/tmp", True, ("/tmp/venv/lib",))]
    assert all(c.path != "/tmp/home" for c in inside)


def test_interpreter_paths_are_resolved_and_exist():
    paths = sandbox_fs.interpreter_paths()
    assert paths == sorted(set(paths)) and all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    assert os.path.realpath(os.__file__).startswith(tuple(p + "/" for p in paths))  # the standard library


def _in_new_mount_namespace(body) -> dict:
    """body() in a forked child in a new mount namespace; its dict back (or {"error": ...})."""
    def unshared():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare")
        return body()

    return in_forked_child(unshared)


def _probe(path: str) -> str:
    try:
        with open(path, "a", encoding="utf-8"):
            return "writable"
    except OSError as e:
        return os.strerror(e.errno)


@as_root
def test_enter_builds_a_read_only_view_with_a_private_tmp(tree):
    def body():
        needed = str(tree / "closed" / "inner" / "needed")
        plan = Plan(sandbox_fs.plan_covers([needed], str(tree / "home"), hide_closed=True), "/tmp/stage/work",
                    12345, 4 << 20)
        sandbox_fs.enter(plan)
        return {"open": _probe(str(tree / "open" / "new.txt")), "root_fs": _probe("/etc/flacuna-probe"),
                "revealed": open(os.path.join(needed, "lib.py")).read(),
                "revealed_write": _probe(os.path.join(needed, "lib.py")),
                "hidden": sorted(os.listdir(tree / "closed")), "home": sorted(os.listdir(tree / "home")),
                "tmp": sorted(os.listdir("/tmp")), "tmp_write": _probe("/tmp/new.txt"),
                "dev": sorted(os.listdir("/dev")), "dev_null": _probe("/dev/null"), "dev_shm": _probe("/dev/shm/x"),
                "workdir": [os.stat("/tmp/stage/work").st_uid, oct(os.stat("/tmp/stage/work").st_mode & 0o777)]}

    got = _in_new_mount_namespace(body)
    assert got == {"open": "Read-only file system", "root_fs": "Read-only file system", "revealed": "x = 1",
                   "revealed_write": "Read-only file system", "hidden": ["inner"], "home": [],
                   "tmp": ["stage"], "tmp_write": "writable", "workdir": [12345, "0o700"],
                   "dev": sorted(["fd", "stdin", "stdout", "stderr", "shm"] + [d for d in sandbox_fs._DEVICES
                                                                               if os.path.exists(f"/dev/{d}")]),
                   "dev_null": "writable", "dev_shm": "writable"}
    assert not (tree / "open" / "new.txt").exists() and not os.path.exists("/tmp/stage")  # ours is untouched


@as_root
def test_remounting_each_mount_read_only_where_mount_setattr_is_missing(tree):
    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(None, b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None) != 0:  # MS_REC | MS_PRIVATE
            raise OSError(ctypes.get_errno(), "mount")
        sandbox_fs.remount_each_read_only()
        return {"root": _probe(str(tree / "open" / "new.txt")), "dev_shm": _probe("/dev/shm/flacuna-probe")}

    assert _in_new_mount_namespace(body) == {"root": "Read-only file system", "dev_shm": "Read-only file system"}


@as_root
def test_a_mount_that_fails_is_named():
    def body():
        sandbox_fs.enter(Plan((Cover("/nonexistent-flacuna-dir", True, ()),), "/tmp/w", -1, 1 << 20))
        return {}

    assert _in_new_mount_namespace(body) == {
        "error": "SetupError: [Errno 2] mount tmpfs on /nonexistent-flacuna-dir: No such file or directory"}
