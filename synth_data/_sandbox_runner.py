"""In-sandbox runner: set resource limits, install the audit hook, then run the untrusted program.

This file runs INSIDE the sandbox process (`python -I -S _sandbox_runner.py SPEC_JSON`), standard library
only. SPEC_JSON holds `work` (the working directory), `program` (file name inside it), `limits`
({"as_mb", "cpu_s", "nproc", "fsize_mb"}) and `audit_hook` (bool).

The audit hook is the second layer of the sandbox (the first, where the kernel allows it, is the
namespace jail set up by `_sandbox_jail.py`): it refuses file access outside `work` and the standard library, deletion
and renames outside `work`, sockets, subprocesses, exec, fork and ctypes. Audit hooks cannot be removed
once added, and refusing ctypes closes the usual route to patching memory around them.
"""

from __future__ import annotations

import json
import os
import resource
import sys

_DENIED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.addressof", "ctypes.call_function", "os.chroot", "os.setuid", "sys.setprofile", "sys.settrace",
    "sys._current_frames", "code.__new__", "function.__new__",
})
_DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "mmap", "fcntl"})
# Events whose first argument is a path the program wants to change (write access needed).
_WRITE_PATH_EVENTS = frozenset({
    "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime", "os.chflags",
    "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile", "shutil.copytree",
    "shutil.move", "shutil.chown", "os.mkfifo", "os.mknod",
})
# Events with (src, dst) paths: both must be inside the work dir.
_TWO_PATH_EVENTS = frozenset({"os.rename", "os.link", "os.symlink"})
# Events that read a path (listing, stat-like): read roots allowed.
_READ_PATH_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.listxattr", "os.getxattr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _set_limits(limits: dict[str, int]) -> None:
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (limits["as_mb"] * mib, limits["as_mb"] * mib))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize_mb"] * mib, limits["fsize_mb"] * mib))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def _make_hook(work: str, read_roots: list[str]):
    real = os.path.realpath
    work = real(work)
    roots = tuple(real(r) for r in read_roots)

    def inside(path: object, allowed: tuple[str, ...]) -> bool:
        if isinstance(path, int):  # an already open descriptor: opening it grants nothing new
            return True
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            path = os.fspath(path)  # type: ignore[arg-type]
        p = real(path)
        return any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].split(".")[0] in _DENIED_MODULES:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "open":
            path, mode, flags = args
            if path is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            allowed = (work,) if writing else (work, *roots)
            if not inside(path, allowed):
                raise PermissionError(f"sandbox: access to {path!r} is not allowed")
        elif event in _WRITE_PATH_EVENTS:
            if not inside(args[0], (work,)):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} is not allowed")
        elif event in _TWO_PATH_EVENTS:
            if not (inside(args[0], (work,)) and inside(args[1], (work,))):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
        elif event in _READ_PATH_EVENTS:
            if not inside(args[0] if args[0] is not None else ".", (work, *roots)):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} is not allowed")

    return hook


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.chdir(spec["work"])
    program = os.path.join(spec["work"], spec["program"])
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    _set_limits(spec["limits"])
    if spec["audit_hook"]:
        # Under `-I -S` sys.path holds only the standard library: the program may import from there.
        sys.addaudithook(_make_hook(spec["work"], [p for p in sys.path if p]))
    sys.argv = [program]
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
