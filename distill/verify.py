"""`distill verify RUN`: check every artifact of a run and print one verdict line per stage.

For each stage of the run's config (RUN/config.yaml): the manifest is complete; the files verify (data and
logit-store shards by sha256, model weights by their safetensors header against the file size, reports
parse); the teacher identity (tokenizer hash, vocab size) is the data's; and the fingerprint recorded when
the stage completed matches the one its config and inputs give now (distill/pipeline.py). Exit status 1
when anything is wrong, with the command that repairs it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from core.artifacts import ArtifactError, is_complete, read_manifest
from core.config import load_config
from core.packed import PackedRows
from distill.pipeline import STAGES, Stage, describe_change, fingerprint
from teachers.store import LogitStore


class Problem(Exception):
    """What is wrong with one stage, as its verdict line says it."""


def _safetensors_ok(path: Path) -> None:
    """The file holds every byte its header promises (a truncated or overwritten weight file does not)."""
    if not path.is_file():
        raise Problem(f"{path} missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
            raise Problem(f"{path}: unreadable safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise Problem(f"{path}: {size} bytes, its header describes {8 + length + end} (truncated or corrupt)")


def _model_folder(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise Problem(f"{folder}: not a model folder (config.json and *.safetensors expected)")
    for path in weights:
        _safetensors_ok(path)
    return f"{folder.name}/ weights intact"


def _check_files(stage: Stage, run_dir: Path, folder: Path) -> str:
    """The stage's own files; returns what was checked."""
    if stage.name == "data":
        rows = PackedRows(folder)
        bad = rows.verify()
        if bad:
            raise Problem(f"shards {', '.join(bad)} fail their sha256 — {rows.repair}")
        return f"{len(rows)} rows in {len(rows.records)} shards, sha256 verified"
    if stage.name == "capture":
        store = LogitStore(folder, verify=True)
        num_train = read_manifest(run_dir / "data", "data")["num_train"]
        if len(store) != num_train:
            raise Problem(f"{len(store)} sequences, the data has {num_train} rows")
        return f"{len(store)} sequences in {len(store.shards)} shards, sha256 verified"
    if stage.name == "synth":
        import datasets

        rows = len(datasets.load_from_disk(str(folder / "dataset")))
        return f"{rows} samples"
    if stage.name == "student":
        return _model_folder(folder)
    if stage.name in ("train", "anneal", "publish"):
        return _model_folder(folder if stage.name == "publish" else folder / "final")
    if stage.name == "eval":
        report = json.loads((folder / "report.json").read_text())
        failed = [f"{m}/{t}" for m, errors in (report.get("errors") or {}).items() for t in errors]
        if failed:
            raise Problem(f"tasks failed: {', '.join(failed)}")
        return "report.json complete"
    return "ok"


def _verdict(stage: Stage, cfg, run_dir: Path, data_teacher: dict | None) -> tuple[bool, str]:
    folder = run_dir / stage.folder
    if not folder.exists():
        return False, f"{stage.name}: NOT RUN — `distill run {run_dir / 'config.yaml'} -o {run_dir}` runs it"
    if not is_complete(folder, stage.name):
        return False, f"{stage.name}: INCOMPLETE — `distill run {run_dir / 'config.yaml'} -o {run_dir}` resumes it"
    try:
        manifest = read_manifest(folder, stage.name)
        checked = _check_files(stage, run_dir, folder)
        teacher = manifest.get("teacher") or {}
        if data_teacher and teacher and teacher.get("tokenizer_hash") != data_teacher.get("tokenizer_hash"):
            raise Problem(f"made with tokenizer {teacher.get('tokenizer_hash')}, the data with "
                          f"{data_teacher.get('tokenizer_hash')}")
        recorded, current = manifest.get("fingerprint"), fingerprint(stage, cfg, run_dir)
        if recorded is not None and recorded != current:
            raise Problem(f"STALE ({describe_change(recorded, current)}) — `distill run "
                          f"{run_dir / 'config.yaml'} -o {run_dir}` recomputes it")
        note = "" if recorded is not None else " (no fingerprint: made by torchrun or an older version)"
        return True, f"{stage.name}: ok — {checked}{note}"
    except (Problem, ArtifactError, OSError, json.JSONDecodeError) as err:
        return False, f"{stage.name}: BAD — {err}"


def verify_run(run_dir: Path) -> int:
    """Print one verdict line per enabled stage; 0 when every stage is complete and sound, else 1."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    data_teacher = None
    if is_complete(run_dir / "data", "data"):
        data_teacher = read_manifest(run_dir / "data", "data").get("teacher")
    ok = True
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        good, line = _verdict(stage, cfg, run_dir, data_teacher)
        print(line)
        ok &= good
    return 0 if ok else 1
