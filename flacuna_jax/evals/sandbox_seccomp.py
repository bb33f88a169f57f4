"""The sandbox's seccomp filter: system calls no HumanEval program needs and an escape would, refused.

Classic BPF assembled here and installed with prctl(PR_SET_SECCOMP) through ctypes, so nothing beyond
the standard library is needed (no libseccomp). Stdlib only: the sandbox's child imports it.

    install(processes=True)     # after prctl(PR_SET_NO_NEW_PRIVS): from now on, in this process and its children

Refused with EPERM: reaching into other processes (ptrace, process_vm_*, pidfd_getfd, kcmp,
process_madvise), mounting and namespaces (mount, umount2, pivot_root, chroot, the new mount API,
unshare, setns, clone with a CLONE_NEW* flag), the kernel keyrings (shared by all processes of a
uid, namespaces or not), bpf, perf_event_open, userfaultfd and io_uring (large kernel attack
surface), modules, kexec, reboot, swap, accounting, quotas, file handles, syslog, clocks, host and
domain names, and `socket` (every family: no network in any form, AF_UNIX paths included; socketpair,
which makes an already connected pair, stays). clone3 answers ENOSYS, so the C library falls back to
clone, whose flags a filter can read (clone3's are behind a pointer). With `processes=False` (the
mode without a PID namespace) no new process can be made at all (fork, vfork, clone without
CLONE_THREAD), where nothing else would stop a daemon from outliving the program, and signals may go
to this process only (kill, tgkill, rt_(tg)sigqueueinfo to our pid, 0 or our group; no tkill, no
pidfd_open or pidfd_send_signal), where it could otherwise signal every process of its uid. Another
architecture's system calls (e.g. 32-bit ones on x86_64) kill the process.

Only x86_64 and aarch64 are known (`supported()`); elsewhere the sandbox runs without a filter and
says so in `Outcome.isolation`.
"""

from __future__ import annotations

import ctypes
import os
import struct

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64, aarch64 = asm-generic) numbers, from linux/include/uapi/asm-generic/unistd.h and
# arch/x86/entry/syscalls/syscall_64.tbl (checked against this machine's <asm/unistd_64.h>).
_DENIED = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "process_madvise": (440, 440),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "unshare": (272, 97), "setns": (308, 268),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "fanotify_init": (300, 262), "lookup_dcookie": (212, 18), "syslog": (103, 116), "vhangup": (153, 58),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "adjtimex": (159, 171),
    "clock_adjtime": (305, 266), "sethostname": (170, 161), "setdomainname": (171, 162),
    "socket": (41, 198),
    "iopl": (172, None), "ioperm": (173, None), "uselib": (134, None),
}
_CLONE, _CLONE3 = (56, 220), (435, 435)
_FORKS = (57, 58)  # fork, vfork: x86_64 only (aarch64 has clone alone)
# Without a PID namespace (processes=False) a signal may go to this process only: its target (the
# first argument, a pid or thread group id) must be our pid, 0 or -pid (our group: we lead a session)
_SIGNAL_BY_PID = {"kill": (62, 129), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
                  "rt_tgsigqueueinfo": (297, 240)}
_SIGNAL_OTHERWISE = {"tkill": (200, 130), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424)}  # refused
_CLONE_THREAD = 0x00010000
_CLONE_NEW_ANY = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_X32_BIT = 0x40000000  # x86_64's x32 ABI numbers: refused like the rest of another ABI

_EPERM, _ENOSYS = 1, 38
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low 32 bits on little-endian)
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def supported() -> bool:
    return os.uname().machine in _AUDIT_ARCH


def denied_numbers(machine: str) -> dict[str, int]:
    """{name: number} of the calls refused with EPERM on `machine` (always, whatever `processes`)."""
    column = 0 if machine == "x86_64" else 1
    return {name: nrs[column] for name, nrs in _DENIED.items() if nrs[column] is not None}


def program(machine: str, processes: bool = True, own_pid: int = 0) -> list[tuple[int, int, int, int]]:
    """The filter for `machine`, as (code, jt, jf, k) instructions (`own_pid`: see processes=False)."""
    x86 = machine == "x86_64"
    column = 0 if x86 else 1
    if not processes and own_pid <= 0:
        raise ValueError("processes=False needs own_pid, the only process signals may go to")
    code: list[tuple] = [(_LD_ABS_W, 0, 0, _ARCH), (_JEQ, 1, 0, _AUDIT_ARCH[machine]), ("ret", "kill"),
                         (_LD_ABS_W, 0, 0, _NR)]
    if x86:
        code.append((_JGE, "kill", None, _X32_BIT))
    code += [(_JEQ, "eperm", None, nr) for nr in denied_numbers(machine).values()]
    code.append((_JEQ, "enosys", None, _CLONE3[column]))
    if not processes:
        code += [(_JEQ, "eperm", None, nr) for nr in (_FORKS if x86 else ())]
        code += [(_JEQ, "eperm", None, nrs[column]) for nrs in _SIGNAL_OTHERWISE.values()]
        code += [(_JEQ, "signal", None, nrs[column]) for nrs in _SIGNAL_BY_PID.values()]
    code += [(_JEQ, "clone", None, _CLONE[column]), ("ret", "allow")]
    code += [("label", "clone"), (_LD_ABS_W, 0, 0, _ARG0), (_JSET, "eperm", None, _CLONE_NEW_ANY)]
    if not processes:
        code.append((_JSET, "allow", "eperm", _CLONE_THREAD))
        code += [("label", "signal"), (_LD_ABS_W, 0, 0, _ARG0), (_JEQ, "allow", None, own_pid),
                 (_JEQ, "allow", None, 0), (_JEQ, "allow", "eperm", -own_pid & 0xFFFFFFFF)]
    code += [("ret", "allow")]
    code += [("label", "allow"), ("ret", "allow"), ("label", "eperm"), ("ret", "eperm"),
             ("label", "enosys"), ("ret", "enosys"), ("label", "kill"), ("ret", "kill")]
    return _assemble(code)


def _assemble(code: list[tuple]) -> list[tuple[int, int, int, int]]:
    """Resolves labels into the forward jump offsets BPF wants (relative to the next instruction)."""
    results = {"allow": _RET_ALLOW, "eperm": _RET_ERRNO | _EPERM, "enosys": _RET_ERRNO | _ENOSYS,
               "kill": _RET_KILL_PROCESS}
    labels, position = {}, 0
    for ins in code:
        if ins[0] == "label":
            labels[ins[1]] = position
        else:
            position += 1
    out: list[tuple[int, int, int, int]] = []
    for ins in code:
        if ins[0] == "label":
            continue
        if ins[0] == "ret":
            out.append((_RET, 0, 0, results[ins[1]]))
            continue
        op, jt, jf, k = ins
        here = len(out)

        def offset(target):
            if target is None:
                return 0  # fall through
            if isinstance(target, int):
                return target
            jump = labels[target] - here - 1
            if not 0 <= jump <= 255:
                raise ValueError(f"seccomp: jump to {target} out of range ({jump})")
            return jump

        out.append((op, offset(jt), offset(jf), k))
    return out


def install(processes: bool = True) -> None:
    """Installs the filter on this process (inherited by every child); needs no_new_privs or CAP_SYS_ADMIN.
    Raises OSError if the kernel refuses it."""
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise OSError(f"seccomp: no system call table for {machine}")
    instructions = program(machine, processes, os.getpid())
    blob = b"".join(struct.pack("=HBBI", *ins) for ins in instructions)
    buffer = ctypes.create_string_buffer(blob, len(blob))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Program(len(instructions), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp: prctl(PR_SET_SECCOMP) failed: {errno}")
