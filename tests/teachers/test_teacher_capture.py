"""The capture stage: store contents match the teacher, compatibility checks, resumption after a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from capture_testdata import make_run, store_files

import teachers.capture as capture_mod
from core.artifacts import ArtifactError
from core.config import save_config
from teachers.capture import capture, progress_path
from teachers.store import LogitStore, reconstruction_kl, write_shard

REPO = Path(__file__).resolve().parents[2]


def test_capture_writes_the_teachers_topk(tmp_path, tiny_teacher_dir, eos_id, monkeypatch):
    cfg, ids, pos = make_run(tmp_path, tiny_teacher_dir, eos_id, num=5, length=32, per_shard=2)
    out = capture(cfg, tmp_path)
    assert out == tmp_path / "logits"

    store = LogitStore(out)
    assert len(store) == 5 and store.k == 16
    m = store.manifest
    assert m["stage"] == "capture" and m["k"] == 16 and m["logprob_mode"] == "raw" and m["dtype"] == "float32"
    assert m["teacher"]["vocab_size"] == 49152 and m["teacher"]["id"] == str(tiny_teacher_dir)
    assert len(m["teacher"]["tokenizer_hash"]) == 16 and "data" in m["inputs"] and m["num_sequences"] == 5
    assert [(s["start"], s["end"]) for s in m["store"]["shards"]] == [(0, 2), (2, 4), (4, 5)]
    assert all(len(s["sha256"]) == 64 for s in m["store"]["shards"])

    backend = capture_mod.make_backend(cfg.teacher, tiny_teacher_dir)
    exact = backend.score(ids, pos, 16)
    backend.close()
    for i in range(5):
        assert torch.equal(store.tokens(i), ids[i].long())
        assert torch.equal(store[i].ids.sort(-1).values, exact[i].ids.sort(-1).values)
        assert reconstruction_kl(exact[i], store[i]).max() <= 1e-3

    # A finished capture returns at once: no teacher is loaded, nothing is rewritten.
    before = (out / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(capture_mod, "make_backend", lambda *a: pytest.fail("teacher loaded again"))
    assert capture(cfg, tmp_path) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_capture_refuses_data_from_another_tokenizer(tmp_path, tiny_teacher_dir, eos_id):
    cfg, _, _ = make_run(tmp_path, tiny_teacher_dir, eos_id, num=2, length=16, per_shard=2)
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"]["tokenizer_hash"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"data/manifest.json.*tokenizer"):
        capture(cfg, tmp_path)
    assert not (tmp_path / "logits" / "manifest.json").exists()


def test_resume_after_failure_recomputes_only_missing_or_corrupt_shards(tmp_path, tiny_teacher_dir, eos_id,
                                                                       monkeypatch):
    cfg, _, _ = make_run(tmp_path, tiny_teacher_dir, eos_id, num=8, length=16, per_shard=2)
    reference = store_files(capture(cfg, tmp_path))
    shutil.rmtree(tmp_path / "logits")

    real = capture_mod.make_backend
    calls = {"n": 0}

    class Failing:
        """Scores three batches (= three shards of two sequences), then dies like an OOM would."""

        def __init__(self, *args):
            self.inner = real(*args)

        def score(self, *args):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("simulated crash")
            return self.inner.score(*args)

        def close(self):
            self.inner.close()

    monkeypatch.setattr(capture_mod, "make_backend", Failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture(cfg, tmp_path)
    progress = json.loads(progress_path(tmp_path / "logits", 0).read_text())
    assert [r["start"] for r in progress["completed"]] == [0, 2, 4]
    # A recorded shard damaged after the crash must be detected and recomputed, not trusted.
    damaged = tmp_path / "logits" / progress["completed"][1]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-7])

    monkeypatch.setattr(capture_mod, "make_backend", real)
    written = []

    def counting_write(folder, start, *args):
        written.append(start)
        return write_shard(folder, start, *args)

    monkeypatch.setattr(capture_mod, "write_shard", counting_write)
    assert store_files(capture(cfg, tmp_path)) == reference
    assert written == [2, 6]


@pytest.mark.slow
def test_sigkill_mid_capture_then_rerun_gives_the_identical_store(tmp_path, tiny_teacher_dir, eos_id):
    """Really SIGKILL a capture process mid-way, rerun it: no sequence lost or duplicated, same bytes."""
    num, per_shard = 48, 2
    cfg, ids, _ = make_run(tmp_path, tiny_teacher_dir, eos_id, num=num, length=128, per_shard=per_shard)
    reference = store_files(capture(cfg, tmp_path))
    shutil.rmtree(tmp_path / "logits")

    config_path = tmp_path / "run.yaml"
    save_config(cfg, config_path)
    script = ("import sys; from pathlib import Path; from core.config import load_config; "
              "from teachers.capture import capture; capture(load_config(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(config_path), str(tmp_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress_file = progress_path(tmp_path / "logits", 0)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress_file.is_file() and len(json.loads(progress_file.read_text())["completed"]) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the capture finished (or failed) before it could be killed"
    assert not (tmp_path / "logits" / "manifest.json").exists()
    done_at_kill = len(json.loads(progress_file.read_text())["completed"])
    assert 3 <= done_at_kill < num // per_shard

    out = capture(cfg, tmp_path)
    assert store_files(out) == reference
    store = LogitStore(out)
    assert len(store) == num
    assert all(torch.equal(store.tokens(i), ids[i].long()) for i in range(num))
