"""Capture throughput vs a bare transformers forward over the same tokens (goal: overhead ≤ 10%).

Builds a small RUN/data folder from the built-in corpora, then, in one process and on the same rows and
batch size, times:
  - bare:    `model(input_ids).logits` per batch (plain causal forward, full-vocab logits, nothing kept),
  - capture: the real `teachers.capture.capture` stage (packed-document mask, chunked top-k, tail mass,
             LZMA encoding, atomic shard writes, progress records), timed from the moment its teacher is
             loaded to its return,
and prints tokens/s of each and their ratio. The bare forward runs before and after the capture so that
drifting machine load shows up. On a shared machine the load drifts anyway, so a second measurement
interleaves, batch by batch, the bare forward with the capture's per-batch work (`backend.score` +
`Codec.encode`, the same code the stage runs), several times each, and keeps the fastest of each: both then
see the same load, and load from outside only adds time. Plain script, not a test:

    .venv/bin/python benchmarks/capture_overhead.py [--rows 16] [--seq-len 256] [--batch-size 4] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import teachers.capture as capture_mod
from core.config import EMBEDDED_TEACHER, from_dict
from core.records import model_vocab_size
from distill.data import build_data, load_split
from teachers.capture import capture
from teachers.hf_backend import TransformersBackend
from teachers.resolve import load_model, resolve_teacher
from teachers.store import Codec


def train_rows(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, position_ids int32 [N, L]: the whole training split of a (small) run."""
    arrays = load_split(data_dir, "train")
    return torch.from_numpy(arrays["input_ids"]), torch.from_numpy(arrays["position_ids"])


def bare_forward_seconds(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            model(input_ids=ids[b:b + batch_size].long()).logits.float()
    return time.perf_counter() - start


def interleaved_seconds(model: torch.nn.Module, backend: TransformersBackend, codec: Codec, ids: torch.Tensor,
                        pos: torch.Tensor, batch_size: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per-batch (bare, capture work) seconds over the same full batches: the two alternate `repeats` times on
    each batch, which goes first switching each time, and each keeps its fastest time (outside load only
    ever adds time)."""

    def capture_work(rows: torch.Tensor, rows_pos: torch.Tensor) -> float:
        start = time.perf_counter()
        for row, top in zip(rows, backend.score(rows, rows_pos, codec.k), strict=True):
            codec.encode(row, top)
        return time.perf_counter() - start

    bare, work = [], []
    for b in range(0, len(ids) - batch_size + 1, batch_size):
        rows, rows_pos = ids[b:b + batch_size], pos[b:b + batch_size]
        bare_s, work_s = [], []
        for repeat in range(repeats):
            if repeat % 2:
                work_s.append(capture_work(rows, rows_pos))
            bare_s.append(bare_forward_seconds(model, rows, batch_size))
            if not repeat % 2:
                work_s.append(capture_work(rows, rows_pos))
        bare.append(min(bare_s))
        work.append(min(work_s))
    return bare, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternations per batch in the interleaved measurement")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=None, help="teacher.topk_chunk_size (default: config's)")
    parser.add_argument("--teacher", default=EMBEDDED_TEACHER)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        cfg = from_dict({
            "teacher": {"model": args.teacher, "batch_size": args.batch_size,
                        **({"topk_chunk_size": args.chunk_size} if args.chunk_size else {})},
            "data": {"seq_len": args.seq_len, "train_tokens": args.rows * args.seq_len,
                     "heldout_sequences_per_domain": 0,
                     "sources": [{"name": d, "domain": d} for d in ("general", "math", "code")]},
            "capture": {"top_k": args.top_k, "sequences_per_shard": args.batch_size * 2},
        })
        build_data(cfg, run)
        ids, _ = train_rows(run / "data")
        tokens = ids.numel()
        model = load_model(resolve_teacher(args.teacher), cfg.teacher.dtype, cfg.teacher.device)
        bare_forward_seconds(model, ids[:1], 1)  # warm-up: first-call allocations and kernel selection
        bare_before = bare_forward_seconds(model, ids, args.batch_size)

        ready: list[float] = []
        real_make_backend = capture_mod.make_backend

        def timed_make_backend(*a):
            backend = real_make_backend(*a)
            ready.append(time.perf_counter())
            return backend

        capture_mod.make_backend = timed_make_backend
        try:
            out = capture(cfg, run)
        finally:
            capture_mod.make_backend = real_make_backend
        capture_s = time.perf_counter() - ready[0]
        bare_after = bare_forward_seconds(model, ids, args.batch_size)
        store_bytes = sum(p.stat().st_size for p in out.glob("shard-*"))
        model_dir = resolve_teacher(args.teacher)
        backend = TransformersBackend(cfg.teacher, model_dir)
        codec = Codec(args.top_k, model_vocab_size(model_dir), cfg.capture.logprob_bits,
                      cfg.capture.logprob_max_step)
        ids, pos = train_rows(run / "data")
        inter_bare, inter_work = interleaved_seconds(model, backend, codec, ids, pos, args.batch_size, args.repeats)

    bare = (bare_before + bare_after) / 2
    print(f"\n{len(ids)} rows × {args.seq_len} tokens = {tokens} tokens, batch {args.batch_size}, top-{args.top_k}, "
          f"top-k chunk {cfg.teacher.topk_chunk_size} positions, "
          f"{torch.get_num_threads()} threads, device {next(model.parameters()).device}")
    print(f"bare forward   : {tokens / bare_before:8.1f} tok/s before, {tokens / bare_after:8.1f} tok/s after")
    print(f"capture stage  : {tokens / capture_s:8.1f} tok/s  ({store_bytes / tokens / args.top_k:.3f} B/entry)")
    print(f"capture / bare time ratio: {capture_s / bare:.3f}  → overhead {100 * (capture_s / bare - 1):+.1f}%")
    inter_tokens = len(inter_bare) * args.batch_size * args.seq_len
    ratios = sorted(w / b for w, b in zip(inter_work, inter_bare, strict=True))
    print(f"interleaved, {len(ratios)} batches, fastest of {args.repeats} each: "
          f"bare {inter_tokens / sum(inter_bare):8.1f} tok/s, score+encode "
          f"{inter_tokens / sum(inter_work):8.1f} tok/s → ratio {sum(inter_work) / sum(inter_bare):.3f}; "
          f"per-batch ratios {' '.join(f'{r:.3f}' for r in ratios)} (median {ratios[len(ratios) // 2]:.3f})")


if __name__ == "__main__":
    main()
