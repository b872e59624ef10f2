"""Run untrusted Python (model-written code and its tests) in a contained child process.

Layers, outermost first:
1. **Namespace jail** (when the kernel lets us: as root, or with unprivileged user namespaces): `unshare`
   new mount, network and PID namespaces; `_sandbox_jail.py` pivots into a tmpfs root holding only
   read-only binds of the interpreter and system libraries plus the throwaway working directory at `/work`,
   then drops to uid `nobody` (as root) and sets no_new_privs. Host files outside are unreachable by any
   path, there is no network (only a down loopback), and all processes die with the program (PID 1).
2. **Audit hook** (`_sandbox_runner.py`, `sys.addaudithook`): refuses opens outside the working directory
   and the standard library, deletes/renames outside it, sockets, subprocess/exec/fork and ctypes. On its
   own (no namespaces available) it is the containment; inside the jail it is defence in depth.
3. **Resource limits** in the child: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, no core
   dumps, few file descriptors; plus a wall-clock timeout in the parent that SIGKILLs the whole process group.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "namespace", "none"]

NOBODY_UID = 65534
MAX_OUTPUT_BYTES = 256 * 1024  # per stream; the rest is dropped (a program printing in a loop)
_HERE = Path(__file__).resolve().parent
_RUNNER = _HERE / "_sandbox_runner.py"
_JAIL = _HERE / "_sandbox_jail.py"


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    `ok` is True exactly when the program exited with code 0 within the time limit. `returncode` is the
    exit status (negative: killed by that signal, e.g. -9 on timeout). `timed_out` is True when the wall
    clock or the CPU-time limit (SIGXCPU) ran out. `isolation` says which outer layer
    was in force: "namespace" (jail + audit hook or jail alone) or "none" (audit hook and limits only).
    """

    ok: bool
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float = 0.0
    isolation: str = "none"


class SandboxUnavailable(RuntimeError):
    """`isolation="namespace"` was requested but this machine cannot create the namespaces."""


def _python() -> str:
    """The real interpreter binary (a venv's python is a symlink to it; the venv itself is not needed)."""
    return os.path.realpath(sys.executable)


def _ro_paths() -> list[str]:
    """Host paths the jail exposes read-only: the interpreter's prefix and the system library folders."""
    prefix = os.path.realpath(sys.base_prefix)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", prefix, stdlib, os.path.dirname(_python())]
    seen: list[str] = []
    for p in paths:
        if os.path.lexists(p) and p not in seen and not any(p.startswith(s + "/") for s in seen if s != "/"):
            seen.append(p)
    return seen


def _jail_command(root: Path, work: Path, runner_spec: str) -> list[str] | None:
    """The `unshare` command line that starts the jail, or None if namespaces are unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return None
    base = [unshare, "--mount", "--net", "--pid", "--fork", "--kill-child"]
    as_root = os.geteuid() == 0
    if not as_root:
        base.insert(1, "--user")
        base.insert(2, "--map-root-user")
    spec = {
        "root": str(root), "work": str(work), "ro_paths": _ro_paths(), "python": _python(),
        "runner": str(_RUNNER), "runner_spec": runner_spec, "drop_uid": NOBODY_UID if as_root else None,
    }
    return [*base, _python(), "-I", "-S", str(_JAIL), json.dumps(spec)]


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether the namespace jail works here (tried once per process with a trivial program)."""
    if _jail_command(Path("/"), Path("/"), "") is None:
        return False
    res = _run("print('jail-ok')", timeout_s=30.0, memory_mb=256, isolation="namespace", audit_hook=True)
    return res.ok and res.stdout.strip() == "jail-ok"


def run_python(program: str, *, timeout_s: float = 10.0, memory_mb: int = 512,
               isolation: Isolation = "auto", audit_hook: bool = True) -> SandboxResult:
    """Run the Python source `program` in a sandbox and return its exit status and (truncated) output.

    `timeout_s` is wall-clock seconds (the CPU limit is the same, rounded up); `memory_mb` caps the address
    space of each process in MiB. `isolation="auto"` uses the namespace jail when available, otherwise the
    audit hook alone; "namespace" requires the jail (raises SandboxUnavailable); "none" skips it.
    `audit_hook=False` is for testing the jail on its own.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"run_python: timeout_s and memory_mb must be > 0, got {timeout_s}, {memory_mb}")
    if isolation == "auto":
        isolation = "namespace" if namespaces_available() else "none"
    elif isolation == "namespace" and not namespaces_available():
        raise SandboxUnavailable("sandbox: cannot create mount/network/PID namespaces here (needs root or "
                                 "unprivileged user namespaces, and util-linux `unshare`)")
    if isolation == "none" and not audit_hook:
        raise ValueError("run_python: isolation='none' with audit_hook=False would run unconfined")
    return _run(program, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation, audit_hook=audit_hook)


def _run(program: str, *, timeout_s: float, memory_mb: int, isolation: str, audit_hook: bool) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        tmp_path = Path(tmp)
        work, root = tmp_path / "work", tmp_path / "root"
        work.mkdir()
        root.mkdir()
        (work / "main.py").write_text(program, encoding="utf-8")
        limits = {"as_mb": int(memory_mb), "cpu_s": max(1, math.ceil(timeout_s)), "nproc": 64, "fsize_mb": 16}
        jailed = isolation == "namespace"
        runner_spec = json.dumps({"work": "/work" if jailed else str(work), "program": "main.py",
                                  "limits": limits, "audit_hook": audit_hook})
        if jailed:
            cmd = _jail_command(root, work, runner_spec)
            assert cmd is not None, "checked by namespaces_available()"
            if os.geteuid() == 0:
                os.chown(work, NOBODY_UID, NOBODY_UID)
                os.chown(work / "main.py", NOBODY_UID, NOBODY_UID)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        else:
            cmd = [_python(), "-I", "-S", str(_RUNNER), runner_spec]
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        duration = time.monotonic() - start
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        timed_out = timed_out or rc == -signal.SIGXCPU  # the CPU limit (= timeout) can strike first
        return SandboxResult(ok=(rc == 0 and not timed_out), returncode=rc, stdout=stdout, stderr=stderr,
                             timed_out=timed_out, duration_s=duration, isolation=isolation)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_capped(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_OUTPUT_BYTES)
    return data.decode("utf-8", errors="replace")
