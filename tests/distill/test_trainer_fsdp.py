"""FSDP (train.parallelism=fsdp) with 2 real processes over gloo: sharded checkpoints written by both ranks
with torch.distributed.checkpoint, exact resume after `kill -9`, the same losses as one process, and a
gathered final model that loads with `from_pretrained`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_trainer import ROOT, _write_config, make_run
from transformers import AutoModelForCausalLM

from core.artifacts import read_manifest
from core.checkpoint import list_checkpoints
from distill.trainer import read_metrics

STEPS = 12


def _torchrun(run_dir: Path, procs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(procs), "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "distill.trainer", str(run_dir / "config.yaml"), str(run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_tree(pid: int) -> None:
    """`kill -9` torchrun and every worker at once, as a lost node would (the workers run in sessions of
    their own, so a process-group kill would miss them)."""
    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        proc.send_signal(signal.SIGKILL)


def _finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, output[-4000:]
    return output


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "train" / "metrics.jsonl")]


@pytest.mark.slow
def test_fsdp_kill_and_resume_matches_uninterrupted_and_one_process(tmp_path, tiny_teacher_dir):
    runs = {}
    for name, parallelism, batch in (("one", "ddp", 4), ("straight", "fsdp", 2), ("killed", "fsdp", 2)):
        runs[name] = tmp_path / name
        cfg = make_run(runs[name], tiny_teacher_dir, max_steps=STEPS, save_every=3, keep_last=1,
                       batch_size=batch, loss_chunk_size=64, parallelism=parallelism)
        _write_config(cfg, runs[name] / "config.yaml")

    _finish(_torchrun(runs["one"], 1))
    _finish(_torchrun(runs["straight"], 2))
    checkpoint = list_checkpoints(runs["straight"] / "train")[-1]
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "optimizer.pt").exists()
    assert read_manifest(runs["straight"] / "train", "train")["world_size"] == 2

    proc = _torchrun(runs["killed"], 2)
    metrics = runs["killed"] / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # past a checkpoint, before the end
        records = read_metrics(metrics)
        if records and records[-1]["step"] >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    _kill_tree(proc.pid)
    proc.wait()
    assert read_metrics(metrics)[-1]["step"] < STEPS
    assert "resumed from" in _finish(_torchrun(runs["killed"], 2))

    one, straight, killed = _losses(runs["one"]), _losses(runs["straight"]), _losses(runs["killed"])
    assert len(one) == len(straight) == len(killed) == STEPS
    for a, b, c in zip(one, straight, killed, strict=True):
        assert abs(b - c) <= 1e-5 and abs(a - b) <= 1e-5, (a, b, c)
    final = {name: AutoModelForCausalLM.from_pretrained(runs[name] / "train" / "final") for name in runs}
    for key, value in final["straight"].state_dict().items():
        assert torch.allclose(value, final["killed"].state_dict()[key], atol=1e-6), key
        assert torch.allclose(value, final["one"].state_dict()[key], atol=1e-4), key
