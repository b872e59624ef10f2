"""Data-parallel capture: N real worker processes (torchrun, Ray) write the very store one worker writes.

Every test compares shard bytes against one reference store captured in this process by a single worker
on one thread. The parallel workers also get one thread each (they run on at most 2 CPUs, and a worker takes
floor(cores / workers) threads), so the float results can be compared bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from capture_testdata import make_run, store_files
from teacher_testdata import packed_rows, write_data_dir

from core.artifacts import ArtifactError
from core.config import RunConfig, save_config
from distill import cli
from teachers.capture import capture, progress_path
from teachers.store import LogitStore, verify_shard

REPO = Path(__file__).resolve().parents[2]
NUM, LENGTH, PER_SHARD = 48, 128, 2  # 24 shards of ~0.1 s each on the tiny teacher: 12 per worker


@dataclass
class Reference:
    cfg: RunConfig
    config: Path  # the cfg as YAML, for worker processes
    run: Path  # a run folder holding data/ and the reference logits/
    files: dict[str, bytes]  # store_files of the reference store


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def at_most_two_cpus():
    """Processes started inside (torchrun, a Ray cluster) inherit ≤ 2 CPUs: 2 workers get 1 thread each."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:2])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir, eos_id) -> Reference:
    run = tmp_path_factory.mktemp("reference")
    cfg, _, _ = make_run(run, tiny_teacher_dir, eos_id, num=NUM, length=LENGTH, per_shard=PER_SHARD)
    save_config(cfg, run / "run.yaml")
    with one_thread():
        out = capture(cfg, run, rank=0, world=1)
    return Reference(cfg, run / "run.yaml", run, store_files(out))


def new_run(tmp_path: Path, ref: Reference) -> Path:
    """A run folder with the reference's data and no logits yet."""
    shutil.copytree(ref.run / "data", tmp_path / "data")
    return tmp_path


def recorded(out: Path, rank: int) -> list[int]:
    """Shard starts in worker `rank`'s progress file."""
    return [r["start"] for r in json.loads(progress_path(out, rank).read_text())["completed"]]


def own_shards(rank: int, world: int = 2) -> set[int]:
    return {start for j, start in enumerate(range(0, NUM, PER_SHARD)) if j % world == rank}


def torchrun(ref: Reference, run: Path, log: Path, *args: str) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m teachers.capture CONFIG RUN [overrides]`, output to `log`."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
           "-m", "teachers.capture", str(ref.config), str(run), *args]
    with at_most_two_cpus(), open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen) -> int:
    return proc.wait(timeout=240)


def identities(out: Path, names: set[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of files: an atomic rewrite gives a file a new inode."""
    return {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in names}


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the child of `launcher` whose environment says RANK=rank (torchrun's workers)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher and \
                    f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
    return None


def test_two_torchrun_workers_write_the_store_one_worker_writes(tmp_path, reference):
    run = new_run(tmp_path, reference)
    log = tmp_path / "torchrun.log"
    assert finished(torchrun(reference, run, log)) == 0, log.read_text()[-3000:]
    out = run / "logits"
    assert store_files(out) == reference.files
    for rank in (0, 1):  # both ran, each recording (at least) its own shards
        assert own_shards(rank) <= set(recorded(out, rank))


def test_killed_worker_loses_only_its_unfinished_shard(tmp_path, reference):
    """SIGKILL worker 1 right after it records its first shard; torchrun then stops worker 0. A rerun
    recomputes only unrecorded shards and gives the reference store; stale temp files are deleted."""
    run, out = new_run(tmp_path, reference), tmp_path / "logits"
    log = tmp_path / "torchrun-1.log"
    proc = torchrun(reference, run, log)
    deadline, killed = time.monotonic() + 240, False
    try:
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            if progress_path(out, 1).is_file() and recorded(out, 1):
                pid = worker_pid(proc.pid, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.005)
        assert killed, "worker 1 finished (or failed) before it could be killed:\n" + log.read_text()[-3000:]
        assert finished(proc) != 0
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "manifest.json").exists()
    # (Its file may also hold records of worker 0 that it found when it started, on a loaded machine.)
    done_by_1 = set(recorded(out, 1)) & own_shards(1)
    assert done_by_1 and done_by_1 < own_shards(1)
    kept = identities(out, {r["file"] for path in out.glob("progress.rank-*.json")
                            for r in json.loads(path.read_text())["completed"]})
    unfinished = min(own_shards(1) - done_by_1)
    stale = [out / f".shard-{unfinished:08d}-{unfinished + PER_SHARD:08d}.safetensors.x1y2z3.tmp",
             out / ".progress.rank-0.json.abc123.tmp", out / ".manifest.rank-1.tmp"]
    stale[0].write_bytes(b"half a shard")
    stale[1].write_text("{")
    stale[2].mkdir()

    log = tmp_path / "torchrun-2.log"
    assert finished(torchrun(reference, run, log)) == 0, log.read_text()[-3000:]
    assert store_files(out) == reference.files
    assert identities(out, set(kept)) == kept
    assert not [p for p in stale if p.exists()]


def test_a_worker_with_another_config_or_data_is_refused_before_it_writes(tmp_path, reference,
                                                                           tiny_teacher_dir, eos_id):
    run, out = new_run(tmp_path, reference), tmp_path / "logits"
    with one_thread():
        capture(reference.cfg, run, rank=0, world=2)
    assert {int(p.name.split("-")[1]) for p in out.glob("shard-*")} == own_shards(0)
    assert not (out / "manifest.json").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # A real worker process (rank and world from the environment, as torchrun sets them) with another top_k.
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    refused = subprocess.run([sys.executable, "-m", "teachers.capture", str(reference.config), str(run),
                              "capture.top_k=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{out / 'plan.json'}: this capture was started with another config" in refused.stderr
    assert "codec.k: 16 → 8 (from capture.top_k" in refused.stderr
    assert f"or delete {out} to start over" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The same config on other data.
    shutil.copytree(run / "data", tmp_path / "saved-data")
    write_data_dir(run, tiny_teacher_dir, *packed_rows(NUM, LENGTH, 49152, eos_id, seed=99))
    with pytest.raises(ArtifactError, match=r"plan\.json: this capture was started with another config or "
                                            r"data — data: .* \(from the rows in RUN/data\)"):
        capture(reference.cfg, run, rank=1, world=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The advice: rerun with the config and data it was started with.
    shutil.rmtree(run / "data")
    shutil.copytree(tmp_path / "saved-data", run / "data")
    with one_thread():
        capture(reference.cfg, run, rank=1, world=2)
    assert store_files(out) == reference.files


def test_ray_with_two_workers_writes_the_store_one_worker_writes(tmp_path, reference):
    ray = pytest.importorskip("ray")
    run = new_run(tmp_path, reference)
    with at_most_two_cpus():
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["capture", str(reference.config), "--output-dir", str(run), "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    out = run / "logits"
    assert store_files(out) == reference.files
    for rank in (0, 1):
        assert own_shards(rank) <= set(recorded(out, rank))


def test_damaged_shards_of_a_complete_store_are_named_and_the_advised_command_repairs_only_them(tmp_path,
                                                                                                 reference):
    run = new_run(tmp_path, reference)
    out = run / "logits"
    shutil.copytree(reference.run / "logits", out)
    save_config(reference.cfg, run / "config.yaml")  # as every `distill` verb records it
    shards = sorted(out.glob("shard-*"))
    shards[1].write_bytes(shards[1].read_bytes()[:-9])
    shards[3].unlink()

    with pytest.raises(ArtifactError) as err:
        LogitStore(out)
    message = str(err.value)
    assert message.startswith(f"{shards[1]}: sha256 ") and "corrupt or truncated" in message
    record = next(r for r in json.loads((out / "manifest.json").read_text())["store"]["shards"]
                  if r["file"] == shards[3].name)
    with pytest.raises(ArtifactError, match=re.escape(f"{shards[3]}: shard missing; `distill capture")):
        verify_shard(out, record)
    command = re.search(r"`(distill capture [^`]+)`", message).group(1)
    assert command == f"distill capture {run / 'config.yaml'} --output-dir {run}"

    kept = identities(out, {p.name for i, p in enumerate(shards) if i not in (1, 3)})
    with one_thread():
        assert cli.main(shlex.split(command)[1:]) == 0
    assert store_files(out) == reference.files
    assert identities(out, set(kept)) == kept
    assert len(LogitStore(out)) == NUM
