"""The `capture` stage: score every training sequence with the teacher once and store its top-k.

Resumable at shard granularity, and data-parallel without any communication. Sequences are cut into shards
of `capture.sequences_per_shard`; shard j of the plan belongs to worker j % world (rank and world from env
RANK / WORLD_SIZE, set by torchrun and accelerate; Ray tasks get them as arguments, teachers/ray_capture.py).
Each shard is scored in batches that start at its first sequence (so it comes out byte-identical whichever
worker computes it, before or after a restart), written atomically, and only then recorded in the worker's
own `progress.rank-R.json` (also atomic). The workers share only the folder:

- `plan.json` (the fingerprint and what it hashes) is created atomically-exclusively by the first worker;
  a worker whose config or data give another fingerprint is refused before it writes anything.
- On start a worker reads every progress file (any rank, any earlier world size) and keeps the records
  whose file still verifies by sha256; it writes them again into its own file along with the shards it
  computes, so no record is lost when the world size changes.
- A worker that has finished its own shards and then finds every shard of the plan recorded writes the
  manifest (the same content from any worker; atomic, so two writing at once is harmless).

A killed worker therefore loses at most its one unrecorded shard (recomputed and overwritten on resume) and
perhaps leaves a stale temp file (deleted on resume by the worker that owns it). Called on a complete store,
capture verifies every shard against the manifest and recomputes only those missing or corrupt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.artifacts import (
    MANIFEST,
    ArtifactError,
    atomic_write_json,
    check_compatible,
    is_complete,
    manifest_hash,
    read_manifest,
    sha256_file,
    sha256_json,
    tokenizer_hash,
    write_manifest,
)
from core.config import ConfigError, InputError, RunConfig, TeacherConfig, load_config, to_dict
from core.packed import PackedRows
from core.records import model_vocab_size
from teachers.backend import make_backend
from teachers.resolve import load_tokenizer, pick_device, resolve_teacher, teacher_identity
from teachers.store import Codec, shard_name, store_fields, write_shard

PLAN = "plan.json"
# The setting behind each part of the fingerprint, named when a worker is refused.
_FINGERPRINT_SOURCES = {
    "codec": "capture.top_k / logprob_bits / logprob_max_step", "data": "the rows in RUN/data",
    "plan": "capture.sequences_per_shard or the number of rows", "teacher": "teacher.model / teacher.revision",
    "backend": "teacher.backend", "dtype": "teacher.dtype",
}
_SHARD_RE = re.compile(r"shard-\d{8}-\d{8}\.safetensors")
_RANK_RE = re.compile(r"\.rank-(\d+)\.")


@dataclass
class CaptureJob:
    """What a capture computes, the same for each of its workers: the shard plan and what the numbers mean."""

    cfg: RunConfig
    out: Path  # RUN/logits
    data_dir: Path  # RUN/data
    rows: PackedRows  # its training rows, read lazily
    model_dir: Path  # the teacher's local HF folder
    teacher: dict[str, Any]  # teacher_identity(...)
    codec: Codec
    num: int  # training rows
    seq_len: int  # tokens per row
    plan: list[tuple[int, int]]  # shards as [start, end) row ranges, in order
    inputs: dict[str, Any]  # what the fingerprint hashes, as JSON values

    @property
    def fingerprint(self) -> str:
        return sha256_json(self.inputs)


def capture(cfg: RunConfig, run_dir: Path, rank: int | None = None, world: int | None = None) -> Path:
    """Capture worker `rank` of `world` (default: env RANK / WORLD_SIZE, else 0 / 1): compute this worker's
    unfinished shards of RUN/logits from RUN/data, then write the manifest if every shard of the plan is in.
    With world = 1 that is the whole stage. Returns RUN/logits, at once when the store is complete and every
    shard verifies. Sequence i of the store is training row i."""
    rank, world = worker_rank(rank, world)
    out = Path(run_dir) / "logits"
    whole, known, damaged = _existing_store(out)
    if whole:
        return out
    if damaged:
        print(f"capture: {out}: {len(damaged)} shard(s) to recompute: {', '.join(damaged)}")
    job = plan_capture(cfg, Path(run_dir))
    _claim_plan(job, rank)
    _remove_stale_temps(job, rank, world)
    done = _verified_records(job, known)
    todo = [(s, e) for j, (s, e) in enumerate(job.plan) if j % world == rank and s not in done]
    if done and todo:
        print(f"capture: worker {rank}/{world} resuming, {len(done)} of {len(job.plan)} shard(s) done in {out}")
    if todo:
        _score_shards(job, todo, done, rank, world)
    missing = _finish(job, done, rank)
    if missing:
        print(f"capture: worker {rank}/{world} done; {len(missing)} shard(s) of other workers still to come "
              f"(the last worker to finish writes {out / MANIFEST})")
    return out


def finish_capture(cfg: RunConfig, run_dir: Path) -> Path:
    """After every worker has returned (the Ray driver): RUN/logits once every shard verifies, writing the
    manifest if no worker did; ArtifactError naming the shards still missing otherwise."""
    out = Path(run_dir) / "logits"
    whole, known, _ = _existing_store(out)
    if whole:
        return out
    job = plan_capture(cfg, Path(run_dir))
    missing = _finish(job, known, rank=0)
    if missing:
        raise ArtifactError(f"{out}: {len(missing)} of {len(job.plan)} shard(s) not captured (the first at "
                            f"sequence {missing[0]}); rerun the same command to capture only those")
    return out


def _existing_store(out: Path) -> tuple[bool, dict[int, dict[str, Any]], list[str]]:
    """(complete and every shard verifies, the records that verify by start, the damaged shard files) of
    a store folder; (False, {}, []) when it has no complete manifest."""
    if not is_complete(out, "capture"):
        return False, {}, []
    known, damaged = _verify_store(out)
    return not damaged, known, damaged


def worker_rank(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world) as given, else from env RANK / WORLD_SIZE (torchrun, accelerate launch), else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise InputError(f"capture: worker rank {rank} must be in [0, world size {world})")
    return rank, world


def progress_path(out: Path, rank: int) -> Path:
    """Worker `rank`'s progress file: {"fingerprint", "completed": [shard records]}."""
    return Path(out) / f"progress.rank-{rank}.json"


def plan_capture(cfg: RunConfig, run_dir: Path) -> CaptureJob:
    """Check RUN/data against the teacher and lay out the shards; loads the tokenizer, not the model."""
    out, data_dir = run_dir / "logits", run_dir / "data"
    data_manifest = read_manifest(data_dir, "data")
    model_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    tokenizer = load_tokenizer(model_dir)
    vocab_size = model_vocab_size(model_dir)
    check_compatible(data_manifest, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size,
                     where=data_dir / MANIFEST)
    teacher = teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, vocab_size)
    rows = PackedRows(data_dir)
    num, seq_len = len(rows), rows.seq_len
    if num == 0:
        raise ArtifactError(f"{data_dir / MANIFEST}: no training rows to capture")
    codec = Codec(cfg.capture.top_k, vocab_size, cfg.capture.logprob_bits, cfg.capture.logprob_max_step)
    if cfg.teacher.backend != "transformers" and codec.k > cfg.teacher.max_logprobs:
        raise InputError(f"capture.top_k={codec.k} exceeds teacher.max_logprobs={cfg.teacher.max_logprobs} "
                         f"(the vLLM engine's cap on prompt logprobs); raise teacher.max_logprobs")
    per_shard = cfg.capture.sequences_per_shard
    plan = [(s, min(s + per_shard, num)) for s in range(0, num, per_shard)]
    # What the stored numbers mean. (Batch and chunk sizes are left out: they move results by float rounding
    # only, and lowering the batch size is the natural fix after an out-of-memory crash, which must not
    # throw away finished shards.)
    inputs = json.loads(json.dumps({
        "codec": codec.to_dict(), "teacher": teacher, "data": manifest_hash(data_dir), "plan": plan,
        "backend": cfg.teacher.backend, "dtype": cfg.teacher.dtype,
    }))
    return CaptureJob(cfg, out, data_dir, rows, model_dir, teacher, codec, num, seq_len, plan, inputs)


# ---------------------------------------------------------------------------------------------------
# Training rows
# ---------------------------------------------------------------------------------------------------


def _shard_rows(rows: PackedRows, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, position_ids int32 [end - start, L]: training rows start..end, read without the others."""
    arrays = rows.read(start, end)
    return torch.from_numpy(arrays["input_ids"]), torch.from_numpy(arrays["position_ids"])


# ---------------------------------------------------------------------------------------------------
# The shared folder: plan, stale temps, progress records, manifest
# ---------------------------------------------------------------------------------------------------


def _claim_plan(job: CaptureJob, rank: int) -> None:
    """Create RUN/logits/plan.json unless a worker already has — exclusively, so of workers racing to create
    it one wins — then refuse this worker, before it writes anything, if its fingerprint differs."""
    path = job.out / PLAN
    job.out.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = job.out / f".{PLAN}.rank-{rank}.tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": job.fingerprint, "inputs": job.inputs}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the file exists: then another worker's plan is checked below
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); delete {job.out} to start over") from None
    if recorded.get("fingerprint") != job.fingerprint:
        old = recorded.get("inputs") or {}
        changes = [f"{'; '.join(_differences(old.get(key), job.inputs.get(key), key))} (from {source})"
                   for key, source in _FINGERPRINT_SOURCES.items() if old.get(key) != job.inputs.get(key)]
        raise ArtifactError(
            f"{path}: this capture was started with another config or data — {'; '.join(changes) or 'fingerprint'}"
            f" — so its shards would not match this worker's. Rerun with the config and data it was started "
            f"with, or delete {job.out} to start over")


def _differences(old: Any, new: Any, name: str) -> list[str]:
    """'name: old → new' for each leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
                for d in _differences(old.get(key), new.get(key), f"{name}.{key}")]
    short = [text if len(text := json.dumps(v)) <= 40 else f"{text[:37]}..." for v in (old, new)]
    return [f"{name}: {short[0]} → {short[1]}"]


def _remove_stale_temps(job: CaptureJob, rank: int, world: int) -> None:
    """Delete temp files (and manifest staging folders) a killed worker left — only those of files that this
    worker alone writes (its shards, its progress file, its plan and manifest temps), so it never deletes one
    that another live worker is writing. Those of ranks ≥ world (an earlier, larger world) fall to rank 0."""
    index = {shard_name(s, e): j for j, (s, e) in enumerate(job.plan)}
    for tmp in job.out.glob(".*.tmp"):
        shard, owner = _SHARD_RE.search(tmp.name), _RANK_RE.search(tmp.name)
        if shard:
            who = index.get(shard.group(0), 0) % world
        else:
            who = int(owner.group(1)) if owner and int(owner.group(1)) < world else 0
        if who != rank:
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()


def _verified_records(job: CaptureJob, known: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Records of the plan's finished shards by start: `known` (verified or written by this worker) plus those
    of every progress file of this fingerprint whose shard file verifies by sha256."""
    done = dict(known)
    shards = set(job.plan)
    for path in sorted(job.out.glob("progress*.json")):  # progress.json: a capture from before the ranks
        try:
            progress = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if progress.get("fingerprint") != job.fingerprint:
            continue
        for record in progress.get("completed", []):
            if (record["start"] not in done and (record["start"], record["end"]) in shards
                    and _shard_ok(job.out, record)):
                done[record["start"]] = record
    return done


def _shard_ok(out: Path, record: dict[str, Any]) -> bool:
    path = out / record["file"]
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]


def _verify_store(out: Path) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """A complete store's shard records whose files verify, by start, and the others' names with why."""
    good, damaged = {}, []
    for record in read_manifest(out, "capture")["store"]["shards"]:
        if _shard_ok(out, record):
            good[record["start"]] = record
        else:
            damaged.append(f"{record['file']} ({'corrupt' if (out / record['file']).is_file() else 'missing'})")
    return good, damaged


def _finish(job: CaptureJob, known: dict[int, dict[str, Any]], rank: int) -> list[int]:
    """Write the manifest if every shard of the plan is recorded (rereading every worker's progress file);
    returns the starts of the shards still missing."""
    done = _verified_records(job, known)
    missing = [s for s, _ in job.plan if s not in done]
    if not missing:
        _write_manifest(job, [done[s] for s, _ in job.plan], rank)
    return missing


def _write_manifest(job: CaptureJob, records: list[dict[str, Any]], rank: int) -> None:
    """The stage's manifest (the same from any worker but for its time). It is staged in a folder of this
    worker's own, which no other worker's stale-temp cleanup touches, then renamed into place."""
    cfg, staging = job.cfg, job.out / f".manifest.rank-{rank}.tmp"
    store = store_fields(job.codec, job.seq_len, records)
    write_manifest(
        staging, "capture",
        config={"capture": to_dict(cfg.capture), "teacher": to_dict(cfg.teacher)},
        teacher=job.teacher, inputs={"data": job.data_dir},
        k=job.codec.k, logprob_mode="raw", dtype=cfg.teacher.dtype, backend=cfg.teacher.backend,
        num_sequences=job.num, seq_len=job.seq_len,
        store=store,
    )
    os.replace(staging / MANIFEST, job.out / MANIFEST)
    shutil.rmtree(staging)
    print(f"capture: {job.num} sequences × {job.seq_len} tokens, top-{job.codec.k}, "
          f"{store['total_bytes'] / 2**20:.1f} MiB ({store['bytes_per_entry']:.3f} B/entry) → {job.out}")


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------


def _score_shards(job: CaptureJob, todo: list[tuple[int, int]], done: dict[int, dict[str, Any]],
                  rank: int, world: int) -> None:
    """Score and write this worker's `todo` shards [(start, end)] in order, recording each in `done` and in
    this worker's progress file as soon as its file is in place."""
    cfg = job.cfg.teacher
    _take_this_workers_share(cfg, world)
    backend = make_backend(cfg, job.model_dir)
    bar = tqdm(total=sum(e - s for s, e in todo) * job.seq_len, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc="capture" if world == 1 else f"capture {rank}/{world}")
    try:
        for start, end in todo:
            input_ids, position_ids = _shard_rows(job.rows, start, end)
            tops = []
            for b in range(0, end - start, cfg.batch_size):
                tops += backend.score(input_ids[b:b + cfg.batch_size], position_ids[b:b + cfg.batch_size],
                                      job.codec.k)
                bar.update(min(cfg.batch_size, end - start - b) * job.seq_len)
            done[start] = write_shard(job.out, start, input_ids, tops, job.codec)
            atomic_write_json(progress_path(job.out, rank), {"fingerprint": job.fingerprint,
                                                             "completed": [done[s] for s in sorted(done)]})
    finally:
        bar.close()
        backend.close()


def _take_this_workers_share(cfg: TeacherConfig, world: int) -> None:
    """One of several workers on a machine: on CPU use floor(cores / workers on this node) threads (torchrun
    sets OMP_NUM_THREADS=1, which would leave cores idle; more would oversubscribe them); on CUDA under
    torchrun or accelerate, use GPU LOCAL_RANK (Ray gives each task its own CUDA_VISIBLE_DEVICES instead)."""
    if world == 1:
        return
    if pick_device(cfg.device) == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    elif cfg.device in ("auto", "cuda") and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


def main(argv: list[str] | None = None) -> int:
    """`python -m teachers.capture CONFIG RUN_DIR [key=value ...]`: one capture worker, rank and world from env
    RANK / WORLD_SIZE — for `torchrun --nproc-per-node N -m teachers.capture ...` or `accelerate launch`."""

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m teachers.capture CONFIG RUN_DIR [section.key=value ...]", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        print(capture(load_config(args[0], args[2:]), Path(args[1])))
    except (ConfigError, ArtifactError, FileNotFoundError, ValueError) as err:
        print(f"capture (worker {os.environ.get('RANK', 0)}): error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
