"""The training loop on a real tiny run directory: a 1-layer LLaMA student on the real 49152-token tokenizer,
the 2-layer tiny teacher online, packed rows with several documents and a loss mask."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama

from core.artifacts import ArtifactError, read_manifest, sha256_file, write_manifest
from core.checkpoint import list_checkpoints
from core.config import from_dict
from core.packed import write_packed_shard
from core.packing import training_positions
from distill.schedule import lr_schedule
from distill.trainer import NonFiniteLossError, read_metrics, run_training, train

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
ROWS = 16


def _pack_rows(rows: int, seq_len: int, eos: int, seed: int) -> dict[str, torch.Tensor]:
    """Random documents (each ended by EOS) packed into rows; every third document masks its first half as
    a "prompt" (loss_mask 0), as SFT data does."""
    gen = torch.Generator().manual_seed(seed)
    ids, pos, mask = [], [], []
    doc = 0
    while len(ids) < rows * seq_len:
        length = int(torch.randint(4, 20, (1,), generator=gen))
        tokens = torch.randint(100, 49000, (length,), generator=gen).tolist() + [eos]
        ids += tokens
        pos += list(range(len(tokens)))
        mask += [0 if doc % 3 == 2 and t < len(tokens) // 2 else 1 for t in range(len(tokens))]
        doc += 1
    n = rows * seq_len
    position_ids = torch.tensor(pos[:n]).reshape(rows, seq_len)
    position_ids[:, 0] = 0  # a row starts a (possibly continued) document
    return {"input_ids": torch.tensor(ids[:n], dtype=torch.int32).reshape(rows, seq_len),
            "position_ids": position_ids.to(torch.int32),
            "loss_mask": torch.tensor(mask[:n], dtype=torch.uint8).reshape(rows, seq_len)}


def make_run(run_dir: Path, teacher_dir: Path, **train_overrides):
    """A run directory with data/ and student_init/, and the config that trains on it."""
    from transformers import AutoTokenizer

    from teachers.resolve import teacher_identity

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    identity = teacher_identity(str(teacher_dir), None, tok, 49152)
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True)
    train_rows = _pack_rows(ROWS, SEQ_LEN, tok.eos_token_id, seed=0)
    train_rows["domain"] = (torch.arange(ROWS) % 2).to(torch.int16)
    shard = write_packed_shard(data_dir / "train" / "000-000000.safetensors", train_rows)
    write_manifest(data_dir, "data", config={}, teacher=identity, domains=["general", "math"],
                   num_train=ROWS, num_heldout=0, seq_len=SEQ_LEN, train_shards=[shard])
    init_dir = make_tiny_llama(run_dir / "student_init", teacher_dir, layers=1, seed=1)
    write_manifest(init_dir, "student", config={}, teacher=identity)
    train_cfg = {"teacher_source": "online", "batch_size": 2, "max_steps": 6, "save_every": 2, "keep_last": 2,
                 "log_every": 1, "lr": 2e-3, "warmup_steps": 1, "loss_chunk_size": 16, **train_overrides}
    cfg = from_dict({
        "teacher": {"model": str(teacher_dir)},
        "data": {"seq_len": SEQ_LEN, "sources": [{"name": "general", "domain": "general"},
                                                  {"name": "math", "domain": "math"}]},
        "capture": {"top_k": 8},
        "train": train_cfg,
    })
    return cfg


def test_training_positions_respect_mask_and_documents():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]])
    select, labels = training_positions(ids, pos, mask)
    # t=0 → 6 ok; t=1 → 7 masked; t=2 → 8 starts a new document; t=3 → 9; t=4 → 10; t=5 has no next token.
    assert select.tolist() == [0, 3, 4]
    assert labels.tolist() == [6, 9, 10]


def test_train_stage_end_to_end(tmp_path, tiny_teacher_dir):
    cfg = make_run(tmp_path, tiny_teacher_dir)
    out = train(cfg, tmp_path)
    manifest = read_manifest(out, "train")
    assert manifest["teacher"]["vocab_size"] == 49152
    assert set(manifest["inputs"]) == {"data", "student_init"}
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["kd"] > 0 and r["ce"] > 0 for r in records)
    # keep_last=2 of the periodic checkpoints 2, 4, 6.
    assert [p.name for p in list_checkpoints(out)] == ["step-000004", "step-000006"]
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000006")  # a checkpoint loads as HF
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["ranks"][0]["sampler"]["draw"] == 12
    assert final.config.num_hidden_layers == 1
    assert train(cfg, tmp_path) == out  # complete: returns at once


def test_ce_objective_and_protected_checkpoints(tmp_path, tiny_teacher_dir):
    cfg = make_run(tmp_path, tiny_teacher_dir, objective="ce", save_every=1, keep_last=1)
    out = tmp_path / "phase"
    run_training(cfg, tmp_path, out_dir=out, init_from=tmp_path / "student_init", weights={"general": 1.0},
                 num_steps=4, lr_at=lr_schedule("constant", peak_lr=1e-3, num_steps=4), save_at={1, 2})
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["kd"] == 0 and r["loss"] == r["ce"] for r in records)
    # 1 and 2 are protected; of the periodic ones only the newest survives.
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002", "step-000004"]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_teacher_dir, monkeypatch):
    import distill.trainer as trainer_mod

    cfg = make_run(tmp_path, tiny_teacher_dir, objective="ce")
    calls = {"n": 0}
    real = trainer_mod.chunked_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        sums = real(*args, **kwargs)
        return sums._replace(loss=sums.loss * float("nan")) if calls["n"] > 3 else sums

    monkeypatch.setattr(trainer_mod, "chunked_loss", poisoned)
    out = tmp_path / "train"
    with pytest.raises(NonFiniteLossError, match=r"train step 4: loss is nan.*step-000002 is kept"):
        run_training(cfg, tmp_path, out_dir=out, init_from=tmp_path / "student_init", weights={"general": 1.0},
                     num_steps=6, lr_at=lambda s: 1e-3, save_at=set())
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["step-000002"]
    before = sha256_file(checkpoints[0] / "model.safetensors")
    assert not (out / "final").exists()
    with pytest.raises(NonFiniteLossError):
        run_training(cfg, tmp_path, out_dir=out, init_from=tmp_path / "student_init", weights={"general": 1.0},
                     num_steps=6, lr_at=lambda s: 1e-3, save_at=set())
    assert sha256_file(checkpoints[0] / "model.safetensors") == before


def test_refuses_store_or_teacher_with_another_tokenizer(tmp_path, tiny_teacher_dir):
    cfg = make_run(tmp_path, tiny_teacher_dir)
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"]["tokenizer_hash"] = "0000deadbeef0000"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tokenizer"):
        train(cfg, tmp_path)
    assert not (tmp_path / "train" / "checkpoints").exists()


def _write_config(cfg, path: Path) -> None:
    from core.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))


def run_trainer_cli(config: Path, run_dir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill.trainer", str(config), str(run_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def kill_after_step(run_dir: Path, step: int) -> int:
    """Start `python -m distill.trainer` on RUN/config.yaml, `kill -9` it once `step` steps are logged (past
    a checkpoint, so the steps after it must be dropped and redone on resume); returns the last logged step."""
    proc = run_trainer_cli(run_dir / "config.yaml", run_dir)
    metrics = run_dir / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        records = read_metrics(metrics)
        if records and records[-1]["step"] >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return read_metrics(metrics)[-1]["step"]


def test_sigkill_then_resume_continues_the_same_curve(tmp_path, tiny_teacher_dir):
    """Really `kill -9` a training process between checkpoints, resume, and compare every step's loss with an
    uninterrupted run."""
    steps = 16
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        cfg = make_run(runs[name], tiny_teacher_dir, max_steps=steps, save_every=4, keep_last=1,
                                 loss_chunk_size=64)
        _write_config(cfg, runs[name] / "config.yaml")

    straight = run_trainer_cli(runs["straight"] / "config.yaml", runs["straight"])
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()[-3000:]

    metrics = runs["killed"] / "train" / "metrics.jsonl"
    assert kill_after_step(runs["killed"], 6) < steps
    assert not (runs["killed"] / "train" / "final").exists()

    resumed = run_trainer_cli(runs["killed"] / "config.yaml", runs["killed"])
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output

    a = read_metrics(runs["straight"] / "train" / "metrics.jsonl")
    b = read_metrics(metrics)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
    final_a = (runs["straight"] / "train" / "final" / "model.safetensors").read_bytes()
    final_b = (runs["killed"] / "train" / "final" / "model.safetensors").read_bytes()
    assert final_a == final_b


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_teacher_dir):
    """Two processes (DDP over gloo on CPU) give the same losses as one process with the same global batch.
    (`accelerate launch --cpu` needs MPI for several processes; `--multi_gpu` on a GPU-less host runs on CPU.)"""
    accelerate = Path(sys.executable).with_name("accelerate")
    losses = {}
    for name, procs, batch in (("one", 1, 4), ("two", 2, 2)):
        run_dir = tmp_path / name
        cfg = make_run(run_dir, tiny_teacher_dir, batch_size=batch, max_steps=4, save_every=0)
        _write_config(cfg, run_dir / "config.yaml")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [str(accelerate), "launch", "--num_processes", str(procs), "--num_machines", "1",
               *(["--multi_gpu"] if procs > 1 else ["--cpu"]),
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill.trainer",
               str(run_dir / "config.yaml"), str(run_dir)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        losses[name] = [r["loss"] for r in read_metrics(run_dir / "train" / "metrics.jsonl")]
        assert read_manifest(run_dir / "train", "train")["world_size"] == procs
    assert len(losses["one"]) == 4
    for a, b in zip(losses["one"], losses["two"], strict=True):
        assert abs(a - b) <= 1e-5, losses


def test_offline_store_matches_online_teacher(tmp_path, tiny_teacher_dir):
    """The same run with targets from the captured logit store and from the online teacher: same data order,
    near-identical losses (the store quantises log-probabilities), and the store is a recorded input."""
    from teachers.capture import capture

    losses = {}
    for source in ("online", "offline"):
        run_dir = tmp_path / source
        cfg = make_run(run_dir, tiny_teacher_dir, teacher_source=source, max_steps=3, save_every=0,
                       ce_weight=0.0, loss="reverse_kl", tail="renormalize", temperature=2.0)
        if source == "offline":
            capture(cfg, run_dir)
        out = train(cfg, run_dir)
        losses[source] = [r["kd"] for r in read_metrics(out / "metrics.jsonl")]
        inputs = set(read_manifest(out, "train")["inputs"])
        assert ("logits" in inputs) == (source == "offline")
    assert all(v > 0 for v in losses["online"])
    for a, b in zip(losses["online"], losses["offline"], strict=True):
        assert abs(a - b) <= 0.05 * a + 1e-6, losses


def test_refuses_a_logit_store_from_another_tokenizer(tmp_path, tiny_teacher_dir):
    from teachers.capture import capture

    cfg = make_run(tmp_path, tiny_teacher_dir, teacher_source="offline")
    logits = capture(cfg, tmp_path)
    manifest = json.loads((logits / "manifest.json").read_text())
    manifest["teacher"]["vocab_size"] = 32000
    (logits / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="vocab_size 32000"):
        train(cfg, tmp_path)
    assert not (tmp_path / "train" / "metrics.jsonl").exists()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a test that trains with
    another precision than the other tests in this process gets a fresh one (and leaves one behind)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_mixed_precision_and_grad_accumulation(tmp_path, tiny_teacher_dir, fresh_accelerate_state):
    """bf16 autocast (the document mask follows the compute dtype) with 2 accumulation micro-batches."""
    cfg = make_run(tmp_path, tiny_teacher_dir, mixed_precision="bf16", grad_accum=2, max_steps=2, save_every=0)
    out = train(cfg, tmp_path)
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["tokens"] == 2 * 2 * SEQ_LEN
