"""Peak memory and speed of the chunked KD loss against a naive full-vocabulary fp32 KL.

Both compute forward + backward of the lm_head and the loss for one row of `--seq` positions with a
`--vocab`-token vocabulary and hidden size `--hidden` (SmolLM2-135M's 576 by default), teacher top-`--k`:

- naive: logits = h @ Wᵀ as one `[seq, vocab]` fp32 tensor, log_softmax, the top-k teacher scattered into a
  dense `[seq, vocab]` distribution, `F.kl_div` (`distill.losses.naive_full_vocab_loss`);
- chunked: `distill.losses.chunked_loss` (forward KL, rest bucket), `--chunk` positions at a time.

Each method runs in its own fresh process. Memory is the peak resident set size above the level just before
the first iteration (the kernel's high-water mark is reset through /proc/self/clear_refs), or on CUDA
`torch.cuda.max_memory_allocated` above the inputs. Speed is the median wall time of `--repeats`
iterations after one warm-up.

    python benchmarks/chunked_loss.py [--seq 2048 --vocab 49152 --chunk 512 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(method: str, seq: int, vocab: int, hidden: int, k: int, chunk: int, repeats: int,
            device: str) -> dict:
    """Run one method in this process and return its timings and peak memory."""
    import torch

    from distill.losses import LossSpec, TopK, chunked_loss, naive_full_vocab_loss, topk_from_logits

    torch.manual_seed(0)
    h = (torch.randn(seq, hidden, device=device) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.05).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device)
    with torch.no_grad():  # a teacher-like top-k, made in slices so setup itself stays small
        parts = [topk_from_logits(torch.randn(256, vocab, device=device) * 3, k) for _ in range(0, seq, 256)]
        target = TopK(*(torch.cat(t)[:seq] for t in zip(*parts, strict=True)))
    spec = LossSpec(objective="kd", loss="forward_kl", tail="bucket", ce_weight=0.0)
    weights = torch.full((seq,), 1.0 / seq, device=device)

    def step() -> float:
        h.grad, w.grad = None, None
        if method == "naive":
            loss = naive_full_vocab_loss(h @ w.T, target) / seq
        else:
            loss = chunked_loss(h, w, labels, weights, target, spec, chunk).loss
        loss.backward()
        return float(loss)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        base = _rss_kib("VmRSS") * 1024
    loss = step()
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"method": method, "peak_bytes": peak, "median_s": statistics.median(times), "times_s": times,
            "loss": loss, "tokens_per_s": seq / statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.seq, args.vocab, args.hidden, args.k, args.chunk, args.repeats, args.device)
    if args.worker:
        print(json.dumps(measure(args.worker, *shape)))
        return 0
    results = {}
    for method in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--worker", method, "--seq", str(args.seq), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--k", str(args.k), "--chunk", str(args.chunk),
               "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    summary = {
        "shape": {"seq": args.seq, "vocab": args.vocab, "hidden": args.hidden, "k": args.k, "chunk": args.chunk,
                  "device": args.device},
        "results": results,
        "memory_ratio": chunked["peak_bytes"] / naive["peak_bytes"],
        "speed_ratio": naive["median_s"] / chunked["median_s"],
    }
    for r in (naive, chunked):
        print(f"{r['method']:>8}: peak {r['peak_bytes'] / 2**20:8.1f} MiB   median {r['median_s']:.3f} s "
              f"({r['tokens_per_s']:.0f} tok/s)   loss {r['loss']:.5f}")
    print(f"chunked / naive: memory {summary['memory_ratio']:.3f}×, speed {summary['speed_ratio']:.2f}× "
          f"(seq {args.seq}, vocab {args.vocab}, hidden {args.hidden}, k {args.k}, chunk {args.chunk}, "
          f"{args.device})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
