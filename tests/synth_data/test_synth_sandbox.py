"""Hostile programs against the sandbox, for each containment layer on its own and together."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from synth_data.sandbox import namespaces_available, run_python

MODES = [
    pytest.param(("namespace", False), id="jail-only"),
    pytest.param(("namespace", True), id="jail+hook"),
    pytest.param(("none", True), id="hook-only"),
]


@pytest.fixture(params=MODES)
def mode(request) -> dict:
    isolation, hook = request.param
    if isolation == "namespace" and not namespaces_available():
        pytest.skip("namespaces unavailable on this machine")
    return {"isolation": isolation, "audit_hook": hook}


def test_ok_program_and_exit_codes(mode):
    res = run_python("import math\nprint(math.factorial(5))", **mode)
    assert res.ok and res.returncode == 0 and res.stdout.strip() == "120" and not res.timed_out
    res = run_python("import sys\nsys.exit(3)", **mode)
    assert not res.ok and res.returncode == 3
    res = run_python("assert 1 + 1 == 3, 'wrong'", **mode)
    assert not res.ok and "AssertionError: wrong" in res.stderr


def test_program_can_use_its_working_directory(mode):
    prog = "open('out.txt', 'w').write('hi')\nimport os\nprint(open('out.txt').read(), os.listdir('.'))"
    res = run_python(prog, **mode)
    assert res.ok, res.stderr
    assert "hi" in res.stdout and "out.txt" in res.stdout


def test_cannot_delete_or_overwrite_files_outside(mode, tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    canary = victim_dir / "canary.txt"
    canary.write_text("precious")
    prog = f"""
import os, shutil
for f in (lambda: os.remove({str(canary)!r}), lambda: shutil.rmtree({str(victim_dir)!r}),
          lambda: open({str(canary)!r}, 'w').write('pwned'), lambda: os.rename({str(canary)!r}, 'stolen'),
          lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):
    try:
        f()
        print('DONE')
    except Exception as e:
        print('refused', type(e).__name__)
"""
    res = run_python(prog, **mode)
    assert canary.read_text() == "precious"
    assert not (tmp_path / "new.txt").exists()
    assert "DONE" not in res.stdout, res.stdout + res.stderr


def test_cannot_read_host_files(mode):
    res = run_python("print(open('/etc/passwd').read())", **mode)
    assert not res.ok and "root:" not in res.stdout
    repo_file = str(Path(__file__).resolve())
    res = run_python(f"print(open({repo_file!r}).read())", **mode)
    assert not res.ok and "Hostile programs" not in res.stdout


def test_infinite_loop_is_killed(mode):
    start = time.monotonic()
    res = run_python("while True:\n    pass", timeout_s=1.5, **mode)
    assert not res.ok and res.timed_out and res.returncode < 0
    assert time.monotonic() - start < 6
    res = run_python("import time\ntime.sleep(100)", timeout_s=1.0, **mode)
    assert res.timed_out and not res.ok and res.returncode == -9


def test_huge_allocation_fails(mode):
    res = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=256, **mode)
    assert not res.ok and "allocated" not in res.stdout and "MemoryError" in res.stderr


def test_fork_is_contained(mode):
    # A child that outlives the program must not survive the sandbox.
    prog = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(30)
    os._exit(0)
print('forked', pid)
"""
    res = run_python(prog, timeout_s=5, **mode)
    if mode["audit_hook"]:
        assert not res.ok and "os.fork is not allowed" in res.stderr
    else:
        assert res.ok, res.stderr
    assert not _live_processes_of_uid(65534), "a sandboxed process outlived run_python"


def test_fork_bomb_is_contained(mode):
    prog = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    res = run_python(prog, timeout_s=1.5, **mode)
    assert not res.ok
    assert not _live_processes_of_uid(65534)


def test_no_network(mode):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    prog = f"""
import socket
s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
s.sendall(b'exfiltrated')
print('CONNECTED')
"""
    try:
        res = run_python(prog, timeout_s=5, **mode)
        assert not res.ok and "CONNECTED" not in res.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_output_is_capped(mode):
    res = run_python("import sys\nfor _ in range(100000):\n    sys.stdout.write('x' * 100)", **mode)
    assert len(res.stdout) <= 256 * 1024


def test_auto_uses_the_jail_when_available():
    res = run_python("print('hi')")
    assert res.ok
    assert res.isolation == ("namespace" if namespaces_available() else "none")


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="unconfined"):
        run_python("pass", isolation="none", audit_hook=False)


def _live_processes_of_uid(uid: int, wait_s: float = 3.0) -> list[int]:
    """Non-zombie processes of `uid`, after giving the kernel `wait_s` to finish killing a namespace."""
    deadline = time.monotonic() + wait_s
    while (pids := _processes_of_uid(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def test_common_standard_library_works(mode):
    # Model-written solutions import these; the audit hook must not break imports (.pyc loading, threads).
    mods = ("random re itertools functools heapq bisect string collections math statistics fractions decimal "
            "datetime typing dataclasses json copy operator textwrap unittest tempfile logging hashlib inspect "
            "enum queue threading").split()
    prog = "\n".join(f"import {m}" for m in mods) + """
t = threading.Thread(target=lambda: None)
t.start()
t.join()
with tempfile.NamedTemporaryFile('w') as f:
    f.write('ok')
print('imports-ok')
"""
    res = run_python(prog, **mode)
    assert res.ok and res.stdout.strip() == "imports-ok", res.stderr
