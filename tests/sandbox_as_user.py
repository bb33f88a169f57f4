"""Runs evals.sandbox as an ordinary user, from a root test: the sandbox's non-root modes, for real.

    python tests/sandbox_as_user.py UID HOME [--no-user-namespaces] < request.json     (as root)

request.json: {"programs": [...], "limits": {Limits fields}}. This process makes itself a mount
namespace in which an unprivileged `UID` can run this interpreter and this repository (our home,
where a pyenv Python lives, is hidden but for them: `sandbox_fs`), drops to `UID` with no
capabilities at all and HOME as its home, and, with --no-user-namespaces, installs a seccomp filter
refusing new namespaces, as a container's or a distribution's policy would. Then `run_programs`
(2 workers); prints one JSON line: {"outcomes": [Outcome as a dict, ...], "warnings": [...]}.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flacuna_jax.evals import sandbox, sandbox_fs, sandbox_privileges, sandbox_seccomp  # noqa: E402

_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8


def main() -> None:
    uid, home = int(sys.argv[1]), sys.argv[2]
    deny_namespaces = "--no-user-namespaces" in sys.argv[3:]
    request = json.load(sys.stdin)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    plan = sandbox_fs.Plan.for_this_interpreter("as-user", uid, 64 << 20, os.path.expanduser("~"), hide_closed=True,
                                                extra_needed=(ROOT,))
    sandbox_fs.enter(plan)  # /tmp is now private (the sandbox's stages go there), the rest read-only
    # /proc writable again, as an ordinary user has it (a user namespace is set up through /proc/self)
    if libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC), None) != 0:
        raise OSError(ctypes.get_errno(), "mount /proc")
    os.environ.update(HOME=home, TMPDIR="/tmp")
    os.chdir(plan.workdir)
    sandbox_privileges.drop(uid)
    if deny_namespaces:
        sandbox_seccomp.install()  # refuses unshare and clone with CLONE_NEW* (and sockets, which we need not)
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger(sandbox.__name__).addHandler(Collect(logging.WARNING))
    outcomes = sandbox.run_programs(request["programs"], sandbox.Limits(**request["limits"]), workers=2)
    print(json.dumps({"outcomes": [dataclasses.asdict(o) for o in outcomes], "warnings": warnings}))


if __name__ == "__main__":
    main()
