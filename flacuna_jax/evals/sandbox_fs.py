"""The file system a sandboxed program sees: the machine's, read-only, with secrets hidden and a private /tmp.

Set up by the sandbox's child in a new mount namespace (as root, or with the capabilities a new user
namespace gives), before the program runs. Stdlib only: the child imports it.

    enter(Plan.for_this_interpreter(stage_name, uid, disk_bytes, home))   # after unshare(CLONE_NEWNS)
    mount_proc()                                                            # as PID 1 of the new PID namespace

What it does, in this order:
1. every mount becomes private (nothing we mount reaches the machine's namespace), then every mount
   read-only and nosuid, recursively (mount_setattr; a remount per mount point on kernels < 5.12);
2. some directories are covered by an empty tmpfs: /tmp and /dev/shm (writable, private, at most
   `disk_bytes` each; the program's own directory is in the new /tmp, so nothing it writes outlives
   it), /run (the machine's sockets), /dev (a new one holds null, zero, full, random, urandom, tty
   and the fd links: no GPU, fuse or kvm device), the caller's home, and, as root, the topmost
   directory on the way to the interpreter that others may not enter (/root for a pyenv Python):
   the program runs as a uid of its own without capabilities, which could not even import the
   standard library otherwise;
3. what the interpreter needs under a covered directory (its prefixes and sys.path, resolved) is
   bound back, read-only, at the same path: the interpreter is visible, the rest of /root is not
   (and likewise the devices of the new /dev);
4. a fresh /proc of the new PID namespace (only the program's own processes), or an empty /proc
   where the kernel refuses that (a user namespace under a /proc with covered parts).
"""

from __future__ import annotations

import ctypes
import os
import sys

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 0x400, 0x800, 0x200000
_ST_TO_MS = ((0x2, _MS_NOSUID), (0x4, _MS_NODEV), (0x8, _MS_NOEXEC), (0x400, _MS_NOATIME),
             (0x800, _MS_NODIRATIME), (0x1000, _MS_RELATIME))  # statvfs f_flag -> mount flag
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_ENOSYS = 38
_SMALL_TMPFS = "size=1m,nr_inodes=1024"  # the read-only covers hold a few directories at most
_INODES_PER_MIB = 64  # the writable tmpfs' inode limit: a program cannot fill memory with empty files

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(OSError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {fstype or source or ''} on {target}")


class _Record:
    """A plain value class (dataclasses and typing cost the child ~40 ms of imports a program)."""

    __slots__ = ()

    def __init__(self, *values):
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(repr(getattr(self, n)) for n in self.__slots__)})"


class Cover(_Record):
    """A directory covered by an empty tmpfs: `writable` (/tmp, /dev/shm: the program's scratch space)
    or read-only, with `reveals`, the paths under it bound back (read-only, device nodes included),
    and `links`, (name, target) symbolic links made in it."""

    __slots__ = ("path", "writable", "reveals", "links")

    def __init__(self, path, writable, reveals=(), links=()):
        super().__init__(path, writable, reveals, links)


class Plan(_Record):
    """`covers`; `workdir`, the program's own directory (in the new /tmp), owned by `uid` (-1: by
    whoever sets up, e.g. in a user namespace); `disk_bytes`, the size of each writable cover."""

    __slots__ = ("covers", "workdir", "uid", "disk_bytes")

    @classmethod
    def for_this_interpreter(cls, stage_name: str, uid: int, disk_bytes: int, home: str | None,
                             hide_closed: bool, extra_needed: tuple[str, ...] = ()) -> "Plan":
        """The plan for this interpreter: `hide_closed` as root (the program's uid is another one)."""
        needed = interpreter_paths() + [os.path.realpath(p) for p in extra_needed if os.path.exists(p)]
        covers = plan_covers(needed, home, hide_closed)
        return cls(covers, os.path.join("/tmp", stage_name, "work"), uid, disk_bytes)


def interpreter_paths() -> list[str]:
    """What this interpreter reads after start-up, resolved: its prefixes and the sys.path entries
    that exist (the standard library, lib-dynload, site-packages)."""
    paths = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)]
    paths += [p for p in sys.path if p]
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths) -> list[str]:
    """`paths` without those under another of them."""
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(_under(p, k) for k in kept):
            kept.append(p)
    return kept


def closed_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that others may not enter (no o+x), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            return None
    return None


_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # all a program gets of /dev
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))


def plan_covers(needed: list[str], home: str | None, hide_closed: bool) -> tuple[Cover, ...]:
    """Which directories to cover and what to bind back under each (see the module docstring): the
    read-only covers first, outermost only, then the writable ones (which may lie in one of them, as
    /dev/shm does in the new /dev). Each needed path goes back into the innermost cover above it."""
    writable = _outermost(os.path.realpath(p) for p in ("/tmp", "/dev/shm") if os.path.isdir(p))
    hidden = [os.path.realpath(p) for p in ("/run", "/dev", home) if p and os.path.isdir(p)]
    if hide_closed:
        hidden += [a for a in (closed_ancestor(p) for p in needed) if a]
    hidden = [h for h in _outermost(hidden) if h != "/" and not any(_under(h, w) for w in writable)]
    order = hidden + writable

    def innermost(path):
        holders = [c for c in order if _under(path, c)]
        return max(holders, key=len) if holders else None

    needed = _outermost(needed)
    covers = []
    for c in order:
        reveals = tuple(p for p in needed if innermost(p) == c)
        links: tuple = ()
        if c == "/dev":  # a /dev of its own: the harmless devices, not the GPUs, fuse or kvm of ours
            reveals += tuple(f"/dev/{d}" for d in _DEVICES if os.path.exists(f"/dev/{d}"))
            links = _DEV_LINKS + ((("shm", os.readlink("/dev/shm")),) if os.path.islink("/dev/shm") else ())
        covers.append(Cover(c, c in writable, reveals, links))
    return tuple(covers)


def _make_read_only() -> None:
    """Every mount read-only and nosuid (mount_setattr, recursive; else a remount per mount point)."""

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    if _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr),
                     ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != _ENOSYS:
        _check(-1, "mount_setattr /")
    remount_each_read_only()


def remount_each_read_only() -> None:
    """Kernels without mount_setattr: each mount point remounted read-only, keeping its other flags
    (a user namespace may not clear the ones it inherited locked)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for point in points:
        try:
            flags = os.statvfs(point).f_flag
        except OSError:  # over-mounted or gone: not reachable by the program either
            continue
        kept = sum(ms for st, ms in _ST_TO_MS if flags & st)
        _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | kept)


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace") if "\\" in field else field


def _mkdirs(path: str, mode: int) -> None:
    if not os.path.isdir(path):
        _mkdirs(os.path.dirname(path), mode)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # the umask may have taken bits away


def make_private() -> None:
    """Every mount private: nothing mounted from now on reaches the machine's namespace. The first
    step, and the one that fails first where mounting is refused."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def enter(plan: Plan) -> None:
    """Steps 1-3 of the module docstring, in the current (new) mount namespace."""
    make_private()
    _make_read_only()
    sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for c in plan.covers for p in c.reveals}
    try:
        for cover in plan.covers:
            size = (f"size={plan.disk_bytes},nr_inodes={max(64, plan.disk_bytes >> 20) * _INODES_PER_MIB},mode=1777"
                    if cover.writable else f"{_SMALL_TMPFS},mode=755")
            _mount("tmpfs", cover.path, "tmpfs", _MS_NOSUID | _MS_NODEV, size)
            for path in cover.reveals:
                _mkdirs(os.path.dirname(path), 0o755)
                if os.path.isdir(f"/proc/self/fd/{sources[path]}"):
                    _mkdirs(path, 0o755)
                else:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
                _mount(f"/proc/self/fd/{sources[path]}", path, None, _MS_BIND | _MS_REC)
            for name, target in cover.links:
                os.symlink(target, os.path.join(cover.path, name))
            for later in plan.covers:  # mount points for the writable covers inside this one
                if later.path != cover.path and _under(later.path, cover.path):
                    _mkdirs(later.path, 0o755)
            if not cover.writable:
                _mount(None, cover.path, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, _SMALL_TMPFS)
    finally:
        for fd in sources.values():
            os.close(fd)
    if not any(c.path == "/tmp" for c in plan.covers):
        raise SetupError(2, "no /tmp to hold the program's directory")
    _mkdirs(os.path.dirname(plan.workdir), 0o755)
    os.mkdir(plan.workdir, 0o700)
    if plan.uid >= 0:
        os.chown(plan.workdir, plan.uid, plan.uid)


def mount_proc() -> bool:
    """A /proc of the current PID namespace; where the kernel refuses that, an empty read-only /proc
    (False), so the machine's processes stay out of sight either way."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY
    if _libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(flags), None) == 0:
        return True
    _mount("tmpfs", "/proc", "tmpfs", flags, _SMALL_TMPFS)
    return False
