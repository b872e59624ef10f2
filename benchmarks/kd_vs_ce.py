"""Does the KD objective work? The same student, data and token budget trained with KD and with CE only.

Builds one run directory with the real pipeline stages (`data` → `student` → `capture`), then trains the
pruned student twice from the same init — `train.objective=kd` (offline top-k store) and `train.objective=ce`
— with identical data order, steps, batch and LR schedule. Both finals (and the untrained init) are then
scored on the held-out rows against the teacher, on the training positions (loss mask, no document
crossing):

- KL-to-teacher: full-vocabulary KL(teacher ‖ student) in nats per position (not the top-k approximation
  the loss uses);
- perplexity: exp(mean cross-entropy on the true next token), for the student and the teacher.

"gap closed" = (KL_ce − KL_kd) / KL_ce: the share of the CE student's KL-to-teacher that KD removes
(target ≥ 0.30).

    python benchmarks/kd_vs_ce.py --work /tmp/kd_vs_ce [--student-size smollm2-prune-4l --steps 48]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def heldout_scores(student_dir: Path, teacher, rows: dict, chunk: int = 256, batch: int = 4) -> dict:
    """Mean full-vocab KL(teacher ‖ student) and student / teacher cross-entropy on the held-out training
    positions of `rows` (the packed `heldout` split)."""
    from core.packing import document_causal_mask, training_positions
    from teachers.resolve import load_model

    student = load_model(student_dir, "float32", "cpu")
    kl_sum = ce_sum = teacher_ce_sum = 0.0
    count = 0
    input_ids = torch.as_tensor(rows["input_ids"]).long()
    position_ids = torch.as_tensor(rows["position_ids"]).long()
    loss_mask = torch.as_tensor(rows["loss_mask"]).long()
    for start in range(0, input_ids.shape[0], batch):
        ids, pos = input_ids[start:start + batch], position_ids[start:start + batch]
        select, labels = training_positions(ids, pos, loss_mask[start:start + batch])
        mask = document_causal_mask(pos)
        hidden = {}
        for name, model in (("teacher", teacher), ("student", student)):
            out = model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
            hidden[name] = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])[select]
        for c in range(0, select.numel(), chunk):
            t = torch.log_softmax(teacher.get_output_embeddings()(hidden["teacher"][c:c + chunk]).float(), -1)
            s = torch.log_softmax(student.get_output_embeddings()(hidden["student"][c:c + chunk]).float(), -1)
            y = labels[c:c + chunk, None]
            kl_sum += float((t.exp() * (t - s)).sum())
            ce_sum += float(-s.gather(-1, y).sum())
            teacher_ce_sum += float(-t.gather(-1, y).sum())
        count += int(select.numel())
    return {"kl_to_teacher": kl_sum / count, "ppl": math.exp(ce_sum / count),
            "teacher_ppl": math.exp(teacher_ce_sum / count), "positions": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the run directories")
    parser.add_argument("--student-size", default="smollm2-prune-4l")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--heldout-per-domain", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from core.config import load_config
    from distill.data import build_data, load_split
    from distill.trainer import read_metrics, train
    from students.init import init_student
    from teachers.capture import capture
    from teachers.resolve import load_model, resolve_teacher

    common = [
        f"data.seq_len={args.seq_len}", f"data.train_tokens={args.train_tokens}",
        f"data.heldout_sequences_per_domain={args.heldout_per_domain}",
        f"capture.top_k={args.top_k}", f"student.size={args.student_size}", "student.init=teacher",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        "train.warmup_steps=2", "train.schedule=cosine", f"train.save_every={args.steps}", "train.log_every=4",
    ]
    base = args.work / "base"
    cfg = load_config(None, common)
    timings = {}
    for name, stage in (("data", build_data), ("student", init_student), ("capture", capture)):
        start = time.perf_counter()
        stage(cfg, base)
        timings[name] = time.perf_counter() - start

    finals = {}
    for objective in ("kd", "ce"):
        run_dir = args.work / objective
        run_dir.mkdir(parents=True, exist_ok=True)
        for shared in ("data", "student_init", "logits"):
            link = run_dir / shared
            if not link.exists():
                os.symlink(base / shared, link)
        ocfg = load_config(None, [*common, f"train.objective={objective}"])
        start = time.perf_counter()
        out = train(ocfg, run_dir)
        timings[f"train_{objective}"] = time.perf_counter() - start
        finals[objective] = out / "final"
        metrics = read_metrics(out / "metrics.jsonl")
        timings[f"tokens_per_s_{objective}"] = metrics[-1]["tokens_per_s"]
        shutil.copy(out / "loss.png", args.work / f"loss_{objective}.png")

    teacher = load_model(resolve_teacher(cfg.teacher.model), "float32", "cpu")
    rows = load_split(base / "data", "heldout")
    scores = {"init": heldout_scores(base / "student_init", teacher, rows)}
    for objective, folder in finals.items():
        scores[objective] = heldout_scores(folder, teacher, rows)
    kl_ce, kl_kd = scores["ce"]["kl_to_teacher"], scores["kd"]["kl_to_teacher"]
    summary = {
        "config": {"student_size": args.student_size, "steps": args.steps, "batch_size": args.batch_size,
                   "seq_len": args.seq_len, "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
                   "lr": args.lr, "top_k": args.top_k, "loss": cfg.train.loss, "tail": cfg.train.tail,
                   "ce_weight_in_kd": cfg.train.ce_weight},
        "scores": scores,
        "gap_closed": (kl_ce - kl_kd) / kl_ce,
        "timings_s": timings,
    }
    teacher_ppl = scores["init"]["teacher_ppl"]
    print(f"held-out: {scores['init']['positions']} positions; teacher ppl {teacher_ppl:.2f}")
    for name in ("init", "ce", "kd"):
        print(f"  {name:>4}: KL-to-teacher {scores[name]['kl_to_teacher']:.4f} nats   ppl {scores[name]['ppl']:.2f}")
    print(f"KD closes {summary['gap_closed']:.1%} of the CE student's KL-to-teacher gap "
          f"(same {summary['config']['train_tokens_seen']} tokens)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
