"""The `capture` stage: score every training sequence with the teacher once and store its top-k.

Resumable at shard granularity. Sequences are cut into shards of `capture.sequences_per_shard`; each shard
is scored in batches that start at the shard's first sequence (so a shard computed after a restart sees the
very same batches and comes out byte-identical), written atomically, and only then recorded in
`progress.json` (also atomic). A killed capture therefore leaves finished shards, at most one unrecorded
shard (recomputed and overwritten on resume) and perhaps a stale temp file (deleted on resume). The manifest
is written last, once every shard is recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from distill.artifacts import (
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
from distill.config import RunConfig, to_dict
from teachers.backend import make_backend
from teachers.resolve import load_tokenizer, resolve_teacher, teacher_identity
from teachers.store import Codec, store_fields, write_shard

PROGRESS = "progress.json"


def capture(cfg: RunConfig, run_dir: Path) -> Path:
    """Write RUN/logits/ (shards + manifest) from RUN/data/train.safetensors; resume a partial capture;
    return at once if it is complete. Sequence i of the store is sequence i of train.safetensors."""
    run_dir = Path(run_dir)
    out, data_dir = run_dir / "logits", run_dir / "data"
    if is_complete(out, "capture"):
        return out
    data_manifest = read_manifest(data_dir, "data")
    model_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    tokenizer = load_tokenizer(model_dir)
    vocab_size = teacher_vocab_size(model_dir)
    check_compatible(data_manifest, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size,
                     where=data_dir / MANIFEST)
    teacher = teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, vocab_size)
    input_ids, position_ids = load_train_rows(data_dir / "train.safetensors")
    num, seq_len = input_ids.shape
    codec = Codec(cfg.capture.top_k, vocab_size, cfg.capture.logprob_bits, cfg.capture.logprob_max_step)
    if cfg.teacher.backend != "transformers" and codec.k > cfg.teacher.max_logprobs:
        raise ValueError(f"capture.top_k={codec.k} exceeds teacher.max_logprobs={cfg.teacher.max_logprobs} "
                         f"(the vLLM engine's cap on prompt logprobs); raise teacher.max_logprobs")
    per_shard = cfg.capture.sequences_per_shard
    plan = [(s, min(s + per_shard, num)) for s in range(0, num, per_shard)]
    # What the stored numbers mean: a partial capture made under other settings is discarded. (Batch and
    # chunk sizes are left out: they move results by float rounding only, and lowering the batch size is
    # the natural fix after an out-of-memory crash, which must not throw away finished shards.)
    fingerprint = sha256_json({
        "codec": codec.to_dict(), "teacher": teacher, "data": manifest_hash(data_dir), "plan": plan,
        "backend": cfg.teacher.backend, "dtype": cfg.teacher.dtype,
    })
    done = _resume(out, fingerprint)
    todo = [(s, e) for s, e in plan if s not in done]

    if todo:
        backend = make_backend(cfg.teacher, model_dir)
        bar = tqdm(total=num * seq_len, initial=sum(e - s for s, e in plan if s in done) * seq_len,
                   unit="tok", unit_scale=True, desc="capture", dynamic_ncols=True)
        try:
            for start, end in todo:
                tops = []
                for b in range(start, end, cfg.teacher.batch_size):
                    stop = min(b + cfg.teacher.batch_size, end)
                    tops += backend.score(input_ids[b:stop], position_ids[b:stop], codec.k)
                    bar.update((stop - b) * seq_len)
                done[start] = write_shard(out, start, input_ids[start:end], tops, codec)
                atomic_write_json(out / PROGRESS, {"fingerprint": fingerprint,
                                                   "completed": [done[s] for s in sorted(done)]})
        finally:
            bar.close()
            backend.close()

    store = store_fields(codec, seq_len, [done[s] for s, _ in plan])
    write_manifest(
        out, "capture",
        config={"capture": to_dict(cfg.capture), "teacher": to_dict(cfg.teacher)},
        teacher=teacher, inputs={"data": data_dir},
        k=codec.k, logprob_mode="raw", dtype=cfg.teacher.dtype, backend=cfg.teacher.backend,
        num_sequences=num, seq_len=seq_len,
        store=store,
    )
    print(f"capture: {num} sequences × {seq_len} tokens, top-{codec.k}, {store['total_bytes'] / 2**20:.1f} MiB "
          f"({store['bytes_per_entry']:.3f} B/entry) → {out}")
    return out


def teacher_vocab_size(model_dir: Path) -> int:
    """`config.vocab_size` of an HF folder (the logits' width, which may exceed len(tokenizer))."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError(f"{path}: no integer vocab_size")
    return vocab


def load_train_rows(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and position_ids int32 [N, L] of a packed data file; errors name the file and tensor."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing — run the data stage first")
    with safe_open(str(path), framework="pt") as f:
        missing = {"input_ids", "position_ids"} - set(f.keys())
        if missing:
            raise ArtifactError(f"{path}: missing tensors {sorted(missing)}")
        input_ids, position_ids = f.get_tensor("input_ids"), f.get_tensor("position_ids")
    if input_ids.ndim != 2 or input_ids.shape != position_ids.shape or input_ids.shape[0] == 0:
        raise ArtifactError(f"{path}: input_ids {tuple(input_ids.shape)} and position_ids "
                            f"{tuple(position_ids.shape)} must be the same non-empty [N, L]")
    return input_ids, position_ids


def _resume(out: Path, fingerprint: str) -> dict[int, dict[str, Any]]:
    """Shards recorded by an earlier run of the same capture whose files still verify, by start index.

    Deletes what a killed run may leave behind: temp files, and every shard when the progress file is
    missing or belongs to another configuration. A recorded shard whose file fails its checksum is dropped
    (and recomputed)."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    progress: dict[str, Any] = {}
    if (out / PROGRESS).is_file():
        try:
            progress = json.loads((out / PROGRESS).read_text())
        except json.JSONDecodeError:
            progress = {}
    if progress.get("fingerprint") != fingerprint:
        for stale in out.glob("shard-*.safetensors"):
            stale.unlink()
        (out / PROGRESS).unlink(missing_ok=True)
        return {}
    done = {}
    for record in progress.get("completed", []):
        path = out / record["file"]
        if path.is_file() and sha256_file(path) == record["sha256"]:
            done[record["start"]] = record
    if done:
        print(f"capture: resuming, {len(done)} shard(s) already done in {out}")
    return done
