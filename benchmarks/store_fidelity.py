"""Logit-store size vs fidelity on the real teacher and the built-in corpora.

Scores a few packed rows of RUN/data-style training text (general, math, code) with the teacher once, keeping
the exact top-256 and tail mass, then encodes them with the store's codec for several k and quantisation
settings and prints, per setting: bytes per entry (one position × one of its k candidates) and per token,
the reconstruction KL(exact ‖ stored) over the k ids + tail bucket (mean, p99, max, nats per position), and
encode/decode time per sequence. Plain script, not a test:

    .venv/bin/python benchmarks/store_fidelity.py [--rows 12] [--seq-len 256] [--teacher embedded:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from core.config import EMBEDDED_TEACHER, TeacherConfig, from_dict
from core.records import TopK, model_vocab_size
from distill.data import build_data, load_split
from teachers.hf_backend import TransformersBackend
from teachers.resolve import resolve_teacher
from teachers.store import Codec, reconstruction_kl

K_MAX = 256
SETTINGS = [  # (k, logprob_bits, logprob_max_step)
    (8, 7, 0.5), (16, 7, 0.5), (32, 7, 0.5), (64, 7, 0.5), (128, 7, 0.5),
    (64, 4, 0.5), (64, 5, 0.5), (64, 6, 0.5), (64, 8, 0.5), (64, 10, 0.5),
    (64, 7, 0.25), (64, 7, 1.0), (64, 6, 0.25),
]


def train_rows(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, position_ids int32 [N, L]: the whole training split of a (small) run."""
    arrays = load_split(data_dir, "train")
    return torch.from_numpy(arrays["input_ids"]), torch.from_numpy(arrays["position_ids"])


def truncate(top: TopK, k: int) -> TopK:
    """The exact top-k from an exact top-K_MAX: the tail gains the mass of ranks k..K_MAX."""
    extra = torch.logsumexp(top.logprobs[:, k:].double(), -1) if k < K_MAX else torch.full_like(
        top.tail_logmass, float("-inf"), dtype=torch.float64)
    tail = torch.logaddexp(top.tail_logmass.double(), extra).float()
    return TopK(ids=top.ids[:, :k], logprobs=top.logprobs[:, :k], tail_logmass=tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12, help="packed rows to score (split over 3 domains)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--teacher", default=EMBEDDED_TEACHER)
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = resolve_teacher(args.teacher)
    vocab = model_vocab_size(model_dir)
    with tempfile.TemporaryDirectory() as run:
        cfg = from_dict({"teacher": {"model": args.teacher},
                         "data": {"seq_len": args.seq_len, "train_tokens": args.rows * args.seq_len,
                                  "heldout_sequences_per_domain": 0,
                                  "sources": [{"name": d, "domain": d} for d in ("general", "math", "code")]}})
        build_data(cfg, Path(run))
        ids, pos = train_rows(Path(run) / "data")
    backend = TransformersBackend(TeacherConfig(model=args.teacher), model_dir)
    t0 = time.perf_counter()
    exact = [top for b in range(0, len(ids), 4) for top in backend.score(ids[b:b + 4], pos[b:b + 4], K_MAX)]
    print(f"teacher {args.teacher}: {len(ids)} rows × {ids.shape[1]} tokens scored in {time.perf_counter() - t0:.1f} s")
    backend.close()

    entries_note = "B/entry = all bytes of the sequence's compressed blob / (tokens × k)"
    print(f"\n{entries_note}; KL(exact ‖ stored) over the k ids + the tail bucket, nats per position")
    print("reference: int64 ids + fp32 logprobs = 12.000 B/entry; uint16 ids + fp16 logprobs = 4.000 B/entry\n")
    header = f"{'k':>4} {'bits':>4} {'step':>5} | {'B/entry':>7} {'B/token':>8} | {'KL mean':>9} {'KL p99':>9} " \
             f"{'KL max':>9} | {'enc ms/seq':>10} {'dec ms/seq':>10}"
    print(header)
    print("-" * len(header))
    for k, bits, step in SETTINGS:
        codec = Codec(k=k, vocab_size=vocab, logprob_bits=bits, logprob_max_step=step)
        size, kls, enc_s, dec_s = 0, [], 0.0, 0.0
        for row, top in zip(ids, exact, strict=True):
            ref = truncate(top, k)
            t0 = time.perf_counter()
            blob = codec.encode(row, ref)
            t1 = time.perf_counter()
            _, stored = codec.decode(blob, len(row))
            dec_s += time.perf_counter() - t1
            enc_s += t1 - t0
            size += len(blob)
            kls.append(reconstruction_kl(ref, stored))
        kl = torch.cat(kls)
        tokens = ids.numel()
        print(f"{k:>4} {bits:>4} {step:>5} | {size / tokens / k:>7.3f} {size / tokens:>8.1f} | "
              f"{kl.mean():>9.2e} {kl.quantile(0.99):>9.2e} {kl.max():>9.2e} | "
              f"{enc_s / len(ids) * 1e3:>10.1f} {dec_s / len(ids) * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
