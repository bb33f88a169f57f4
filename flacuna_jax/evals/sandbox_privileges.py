"""Who a sandboxed program runs as: no capabilities at all, no new privileges, as root a uid of its own.

Stdlib only: the sandbox's child imports it.

    drop(uid)          # as root: every capability set emptied, then setresuid/gid(uid), no_new_privs
    drop(None)         # anywhere else (a user namespace, an ordinary user): the same, keeping the uid
    describe()         # "nocaps" when the five capability sets are all empty, else which are not
    map_own_ids(u, g)  # right after unshare(CLONE_NEWUSER): our uid and gid, and nothing else, exist in it

The bounding set is emptied while we still hold CAP_SETPCAP, so no exec (not even of a set-uid-root or
file-capability binary) can bring a capability back; no_new_privs makes exec ignore those bits too.
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_DUMPABLE, _PR_SET_KEEPCAPS, _PR_CAPBSET_READ, _PR_CAPBSET_DROP = 4, 8, 23, 24
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 38, 47
_AMBIENT_IS_SET, _AMBIENT_CLEAR_ALL = 1, 4
_CAP_SETPCAP = 8
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _fail(what: str) -> None:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _capget() -> tuple[int, int, int]:
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        _fail("capget")
    join = (lambda field: getattr(data[0], field) | getattr(data[1], field) << 32)
    return join("effective"), join("permitted"), join("inheritable")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for i in range(2):
        data[i].effective, data[i].permitted, data[i].inheritable = (
            (v >> (32 * i)) & 0xFFFFFFFF for v in (effective, permitted, inheritable))
    if _libc.capset(ctypes.byref(header), data) != 0:
        _fail("capset")


def _known_caps() -> range:
    """0 .. the kernel's last capability (PR_CAPBSET_READ fails past it; no /proc needed)."""
    last = 0
    while last < 64 and _libc.prctl(_PR_CAPBSET_READ, last, 0, 0, 0) >= 0:
        last += 1
    return range(last)


def _bounding() -> int:
    return sum(1 << cap for cap in _known_caps() if _libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 1)


def _ambient() -> int:
    return sum(1 << cap for cap in _known_caps() if _libc.prctl(_PR_CAP_AMBIENT, _AMBIENT_IS_SET, cap, 0, 0) == 1)


def drop(uid: int | None, keep: int = 0) -> None:
    """Empties the bounding, ambient, inheritable, permitted and effective sets (but for the capability
    numbers in `keep`, a bitmask), switches to `uid` (and its own gid, no groups) unless None, and sets
    no_new_privs. Raises OSError when a step is refused (e.g. setresuid without CAP_SETUID)."""
    effective = _capget()[0]
    if effective & (1 << _CAP_SETPCAP):
        for cap in _known_caps():
            if not keep & (1 << cap) and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                _fail(f"PR_CAPBSET_DROP {cap}")
    _libc.prctl(_PR_CAP_AMBIENT, _AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: then there is none
    if uid is not None:
        if keep and _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            _fail("PR_SET_KEEPCAPS")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        # a uid change makes the process undumpable, and its /proc/self files root's: give them back
        # to it, as any process has them (nothing else runs as this uid, and ptrace is filtered)
        _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    _capset(keep & _capget()[1], keep & _capget()[1], 0)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("PR_SET_NO_NEW_PRIVS")


def held() -> dict[str, int]:
    """The five capability sets of this process, as bitmasks."""
    effective, permitted, inheritable = _capget()
    return {"effective": effective, "permitted": permitted, "inheritable": inheritable,
            "ambient": _ambient(), "bounding": _bounding()}


def describe() -> str:
    """'nocaps', 'cap_dac_read_search' (that one alone, in the weakest root mode), or 'caps(<sets>)'."""
    sets = held()
    if not any(sets.values()):
        return "nocaps"
    if {bits for bits in sets.values() if bits} == {1 << CAP_DAC_READ_SEARCH}:
        return "cap_dac_read_search"
    return "caps(" + ",".join(name for name, bits in sets.items() if bits) + ")"


def map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: our uid and gid (as they were before unshare: inside, until mapped,
    they read as the overflow id 65534) map to themselves. An unprivileged process may map only
    those, and must give up setgroups first."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w", encoding="utf-8") as f:
            f.write(text)
