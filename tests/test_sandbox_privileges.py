"""evals.sandbox_privileges: after `drop`, no capability set holds anything and none comes back.

Each case runs in a forked child of this (root) test process, which reports as JSON on a pipe.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from flacuna_jax.evals import sandbox_privileges
from tests.sandbox_helpers import in_forked_child, make_visible_dir, remove_visible_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs some to drop: run as root")
UID = 1_400_100_000 + os.getpid() % 100_000


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        return os.strerror(e.errno)


@pytest.fixture
def root_only_file():
    base = make_visible_dir()
    (base / "secret.txt").write_text("s3cret")
    (base / "secret.txt").chmod(0o600)
    (base / "theirs.txt").write_text("theirs")
    os.chown(base / "theirs.txt", UID + 1, UID + 1)
    (base / "theirs.txt").chmod(0o600)
    yield base
    remove_visible_dir(base)


def test_drop_to_a_uid_empties_every_set(root_only_file):
    def body():
        sandbox_privileges.drop(UID)
        libc = ctypes.CDLL(None, use_errno=True)
        return {"held": sandbox_privileges.held(), "describe": sandbox_privileges.describe(),
                "ids": [os.getresuid(), os.getresgid(), os.getgroups()], "no_new_privs": libc.prctl(39, 0, 0, 0, 0),
                "secret": _read(str(root_only_file / "secret.txt")),
                "own_environ": "PATH" in _read("/proc/self/environ")}  # dumpable again: its /proc is its own

    got = in_forked_child(body)
    assert got["held"] == {"effective": 0, "permitted": 0, "inheritable": 0, "ambient": 0, "bounding": 0}
    assert got["describe"] == "nocaps" and got["no_new_privs"] == 1
    assert got["ids"] == [[UID] * 3, [UID] * 3, []]
    assert got["secret"] == "Permission denied" and got["own_environ"] is True


def test_drop_keeping_the_uid_as_root_still_reads_only_what_root_owns(root_only_file):
    def body():
        sandbox_privileges.drop(None)
        return {"describe": sandbox_privileges.describe(), "uid": os.getuid(),
                "own": _read(str(root_only_file / "secret.txt")), "theirs": _read(str(root_only_file / "theirs.txt"))}

    # uid 0 without CAP_DAC_OVERRIDE: root's own files (the owner's bits), nobody else's
    assert in_forked_child(body) == {"describe": "nocaps", "uid": 0, "own": "s3cret", "theirs": "Permission denied"}


def test_keeping_one_capability_says_so(root_only_file):
    def body():
        sandbox_privileges.drop(UID, keep=1 << sandbox_privileges.CAP_DAC_READ_SEARCH)
        return {"describe": sandbox_privileges.describe(), "held": sandbox_privileges.held(),
                "secret": _read(str(root_only_file / "secret.txt"))}

    bit = 1 << sandbox_privileges.CAP_DAC_READ_SEARCH
    assert in_forked_child(body) == {"describe": "cap_dac_read_search", "secret": "s3cret", "held": {
        "effective": bit, "permitted": bit, "inheritable": 0, "ambient": 0, "bounding": bit}}


def test_own_ids_map_in_a_new_user_namespace():
    def body():
        sandbox_privileges.drop(UID)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
            return {"skip": os.strerror(ctypes.get_errno())}
        before = os.getuid()  # unmapped: the overflow uid
        sandbox_privileges.map_own_ids(UID, UID)
        return {"before": before, "after": [os.getuid(), os.getgid()], "setgroups": _read("/proc/self/setgroups")}

    got = in_forked_child(body)
    if "skip" in got:
        pytest.skip(f"no user namespace for an ordinary user here: {got['skip']}")
    assert got == {"before": 65534, "after": [UID, UID], "setgroups": "deny\n"}
