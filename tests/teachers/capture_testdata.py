"""Helpers of the capture tests: a run folder for the tiny teacher, and the bytes a capture must reproduce."""

from __future__ import annotations

import json
from pathlib import Path

from teacher_testdata import packed_rows, write_data_dir

from core.config import from_dict


def make_run(tmp_path: Path, model_dir: Path, eos: int, *, num: int, length: int, per_shard: int, k: int = 16):
    """A run folder holding RUN/data for the tiny teacher, and the config that captures it."""
    ids, pos = packed_rows(num, length, 49152, eos, seed=num)
    write_data_dir(tmp_path, model_dir, ids, pos)
    cfg = from_dict({"teacher": {"model": str(model_dir), "batch_size": 2, "topk_chunk_size": 50},
                     "capture": {"top_k": k, "sequences_per_shard": per_shard}})
    return cfg, ids, pos


def store_files(folder: Path) -> dict[str, bytes]:
    """What every capture of the same plan must write identically, however many workers wrote it: each shard
    file, the plan, and the manifest without its creation time. (Progress files say which worker did what.)"""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}
    files["plan.json"] = (folder / "plan.json").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("created")
    manifest.pop("fingerprint", None)  # stamped by the pipeline when a CLI verb ran the stage
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files
