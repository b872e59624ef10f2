"""Namespace jail bootstrap: build a minimal root filesystem, pivot into it, drop privileges, exec the runner.

Runs as PID 1 of fresh mount, network and PID namespaces created by `unshare` (see `sandbox.py`), standard
library only: `python -I -S _sandbox_jail.py SPEC_JSON`. SPEC_JSON holds `root` (an empty folder to become
`/`), `work` (the host working directory, mounted read-write at `/work`), `ro_paths` (host paths bind-mounted
read-only at the same place: the interpreter and the system libraries it links), `python` (interpreter
path), `runner` (host path of `_sandbox_runner.py`), `runner_spec` (its JSON argument), `drop_uid` (uid/gid
to switch to, or null inside a user namespace where only uid 0 is mapped).

After `pivot_root` and the detach of the old root, nothing of the host filesystem but the read-only binds
and `/work` is reachable by any path, so `/etc/passwd` or the repository simply do not exist for the
program. The new network namespace has only a down loopback; the PID namespace makes the program PID 1, so
when it exits or is killed the kernel kills every process it started.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIGKILL = 9
# pivot_root has no glibc wrapper: call it by syscall number.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox jail: {what}: {os.strerror(err)}")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = _enc
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind(src: str, target: str, *, readonly: bool) -> None:
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(src, target, None, MS_BIND | MS_REC)
    if readonly:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(spec: dict) -> None:
    root = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for path in spec["ro_paths"]:
        target = root + path
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.exists(path):
            _bind(path, target, readonly=True)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        _bind(dev, root + dev, readonly=False)
    _bind(spec["work"], root + "/work", readonly=False)
    _mount(None, root + "/work", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/sandbox", exist_ok=True)
    shutil.copyfile(spec["runner"], root + "/sandbox/runner.py")
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root under the new one; detaching "." then removes it entirely.
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise OSError(f"sandbox jail: pivot_root syscall number unknown for {machine}")
    _check(_libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def drop_privileges(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # A uid change clears the parent-death signal that `unshare --kill-child` set: set it again.
    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")


def main() -> None:
    spec = json.loads(sys.argv[1])
    build_root(spec)
    drop_privileges(spec["drop_uid"])
    env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8"}
    python = spec["python"]
    os.execve(python, [python, "-I", "-S", "/sandbox/runner.py", spec["runner_spec"]], env)


if __name__ == "__main__":
    main()
