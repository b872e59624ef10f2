"""The data stage at scale: streamed sources, parallel tokenization, sharded rows read lazily, resume after
`kill -9`, repair of a damaged shard — each compared byte for byte with a straight single-process build."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from core.artifacts import ArtifactError, read_manifest
from core.config import load_config
from core.packed import PackedRows
from distill.data import build_data, load_split

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the model reads tokens and learns to predict the next one from a teacher whose logits it matches "
         "while code and math are upsampled near the end of training").split()


def _texts(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(num)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _overrides(tiny_run_overrides: list[str], source: str, **data) -> list[str]:
    settings = {"train_tokens": 40_000, "seq_len": 64, "shard_chars": 20_000, **data}
    return tiny_run_overrides + [f"data.sources=[{source}]"] + [f"data.{k}={v}" for k, v in settings.items()]


def _shard_bytes(data_dir: Path) -> dict[str, bytes]:
    files = [r["file"] for r in read_manifest(data_dir, "data")["train_shards"]] + ["heldout.safetensors"]
    return {name: (data_dir / name).read_bytes() for name in files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", _texts(1200))


def test_parallel_build_equals_one_process_and_reads_lazily(tmp_path, tiny_run_overrides, corpus):
    source = f"{{name: web, kind: jsonl, domain: general, path: {corpus}}}"
    one = build_data(load_config(ROOT / "configs/tiny.yaml", _overrides(tiny_run_overrides, source)), tmp_path / "a")
    two = build_data(load_config(ROOT / "configs/tiny.yaml", _overrides(tiny_run_overrides, source, num_proc=2)),
                     tmp_path / "b")
    manifest = read_manifest(one, "data")
    assert len(manifest["train_shards"]) > 3  # the budget spans several chunks
    assert _shard_bytes(one) == _shard_bytes(two)
    rows = PackedRows(one)
    assert len(rows) == manifest["num_train"] == -(-40_000 // 64)
    whole = load_split(one, "train")
    picked = rows.take([7, 0, len(rows) - 1])
    for name in ("input_ids", "position_ids", "loss_mask", "domain"):
        assert np.array_equal(picked[name], whole[name][[7, 0, len(rows) - 1]])
    # Held-out documents (every 20th) never reach the training rows.
    train_tokens = set(map(tuple, whole["input_ids"][:, :8].tolist()))
    held = load_split(one, "heldout")
    assert held["input_ids"].shape == (2, 64) and not set(map(tuple, held["input_ids"][:, :8].tolist())) & train_tokens


def test_hf_sources_stream_save_to_disk_and_data_file_folders(tmp_path, tiny_run_overrides, corpus):
    """A `save_to_disk` folder (memory-mapped Arrow) and a folder of data files loaded as a hub dataset would
    be (`load_dataset(..., streaming=True)`) give exactly the rows of the same texts as JSONL."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    arrow = tmp_path / "arrow"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(arrow))
    hub_like = tmp_path / "hub_like"
    hub_like.mkdir()
    _jsonl(hub_like / "train.jsonl", texts)
    built = {}
    for name, source in (
        ("jsonl", f"{{name: s, kind: jsonl, domain: general, path: {corpus}}}"),
        ("arrow", f"{{name: s, kind: hf, domain: general, path: {arrow}, text_field: body}}"),
        ("hub", f"{{name: s, kind: hf, domain: general, path: {hub_like}, split: train}}"),
    ):
        cfg = load_config(ROOT / "configs/tiny.yaml", _overrides(tiny_run_overrides, source, train_tokens=8000))
        built[name] = build_data(cfg, tmp_path / name)
    assert _shard_bytes(built["jsonl"]) == _shard_bytes(built["arrow"]) == _shard_bytes(built["hub"])
    bad = load_config(ROOT / "configs/tiny.yaml", _overrides(
        tiny_run_overrides, f"{{name: s, kind: hf, domain: general, path: {arrow}, text_field: nope}}"))
    with pytest.raises(ValueError, match="field 'nope' not in \\['body'\\]"):
        build_data(bad, tmp_path / "bad")


def test_kill_mid_build_then_rerun_is_identical(tmp_path, tiny_run_overrides, corpus):
    source = f"{{name: web, kind: jsonl, domain: general, path: {corpus}}}"
    overrides = _overrides(tiny_run_overrides, source, shard_chars=4000)
    straight = build_data(load_config(ROOT / "configs/tiny.yaml", overrides), tmp_path / "straight")

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill.cli", "data", str(ROOT / "configs/tiny.yaml"), *overrides, "-o", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = run / ".data.partial" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"]) >= 3:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "data").exists()

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout
    assert _shard_bytes(run / "data") == _shard_bytes(straight)
    assert read_manifest(run / "data", "data")["train_shards"] == read_manifest(straight, "data")["train_shards"]


def test_damaged_shard_is_named_and_repaired_alone(tmp_path, tiny_run_overrides, corpus):
    source = f"{{name: web, kind: jsonl, domain: general, path: {corpus}}}"
    overrides = _overrides(tiny_run_overrides, source)
    out = build_data(load_config(ROOT / "configs/tiny.yaml", overrides), tmp_path)
    before = _shard_bytes(out)
    records = read_manifest(out, "data")["train_shards"]
    victim, other = out / records[1]["file"], out / records[2]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=rf"{victim.name}.*truncated.*distill data CONFIG --output-dir {tmp_path}"):
        PackedRows(out)
    other_mtime = other.stat().st_mtime_ns
    # The advised command repairs it: only the damaged shard is recomputed.
    done = subprocess.run([sys.executable, "-m", "distill.cli", "data", str(ROOT / "configs/tiny.yaml"), *overrides,
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert records[1]["file"] in done.stdout and "recomputing only those" in done.stdout
    assert _shard_bytes(out) == before
    assert other.stat().st_mtime_ns == other_mtime
    PackedRows(out)


def test_a_source_edited_in_place_makes_the_data_stale(tmp_path, tiny_run_overrides, corpus):
    from core.config import InputError
    from distill import pipeline

    source_file = tmp_path / "mine.jsonl"
    source_file.write_bytes(corpus.read_bytes())
    cfg = load_config(ROOT / "configs/tiny.yaml", _overrides(
        tiny_run_overrides, f"{{name: web, kind: jsonl, domain: general, path: {source_file}}}", train_tokens=4000))
    pipeline.run_stage("data", cfg, tmp_path / "run")
    assert [s.action for s in pipeline.plan(cfg, tmp_path / "run", only="data")] == ["skip"]
    _jsonl(source_file, _texts(1200, seed=1))  # same path, other text
    with pytest.raises(InputError, match=r"data: data.sources\[0\].files .*--rerun data"):
        pipeline.plan(cfg, tmp_path / "run", only="data")
