"""On-policy distillation vs off-policy KD vs SFT on teacher samples, from the same student, side by side.

Builds one run directory with the real pipeline stages (`data` → `student`) from configs/on_policy.yaml.
With `--warm-steps W` (default 32) the pruned init is first trained W steps by SFT on teacher samples — the
starting point on-policy distillation is meant for (a student that already imitates the teacher; the
Tinker cookbook and GKD start from an SFT model). Then the same student is trained three times with the same
prompts, prompt order, steps, batch and LR schedule, every completion scored by the teacher (so each arm
costs the same teacher scoring calls):

- `on_policy`: λ = 1, the student samples every completion; reverse KL on the k + 1 support;
- `off_policy_kd`: λ = 0, the teacher samples every completion (sequence-level KD); forward KL on the k + 1
  support at the completion tokens (the standard KD loss);
- `sft`: λ = 0, the same teacher samples; cross-entropy on them only (`ce_weight = 1`).

Each final student (and the pruned init, the warm start and the teacher) is then measured by the gap suite's on_policy
task (evaluation/tasks/on_policy.py) on held-out prompts: reverse KL(student ‖ teacher) per token on the
student's own samples, and greedy arithmetic accuracy. The teacher-scored completion tokens of each arm
are reported next to its results.

    python benchmarks/on_policy.py --work /tmp/on_policy [--warm-steps 32 --steps 16 --limit 20 --json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "on_policy": ["train.on_policy_fraction=1.0", "train.loss=reverse_kl", "train.ce_weight=0.0"],
    "off_policy_kd": ["train.on_policy_fraction=0.0", "train.loss=forward_kl", "train.ce_weight=0.0"],
    "sft": ["train.on_policy_fraction=0.0", "train.loss=forward_kl", "train.ce_weight=1.0"],
}
WARM_START = "sft"  # the arm whose recipe trains the warm start


def measure(model_dir: Path, teacher, limit: int, batch_size: int) -> dict:
    """The on_policy task's metrics of the model in `model_dir` against the loaded teacher."""
    from evaluation.lm import EvalModel
    from evaluation.tasks import EvalContext
    from evaluation.tasks.on_policy import OnPolicy

    model = teacher if model_dir is None else EvalModel(model_dir, tokenizer_path=teacher.path)
    ctx = EvalContext(limit=limit, batch_size=batch_size, teacher=teacher)
    start = time.perf_counter()
    result = OnPolicy().run(model, ctx)
    return {**result.metrics, "eval_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the run directories")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "on_policy.yaml")
    parser.add_argument("--steps", type=int, default=16, help="training steps of each arm")
    parser.add_argument("--warm-steps", type=int, default=32,
                        help="SFT steps on teacher samples before the arms (0: the arms start from the pruned init)")
    parser.add_argument("--limit", type=int, default=20, help="held-out prompts per measurement")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for every arm")
    args = parser.parse_args(argv)

    from core.config import load_config
    from distill.data import build_data
    from distill.schedule import schedule_from_config
    from distill.trainer import read_metrics, run_training
    from evaluation.lm import EvalModel
    from students.init import init_student
    from teachers.resolve import resolve_teacher

    common = list(args.overrides)
    base = args.work / "base"
    cfg = load_config(args.config, common)
    timings = {}
    for name, stage in (("data", build_data), ("student", init_student)):
        start = time.perf_counter()
        stage(cfg, base)
        timings[name] = round(time.perf_counter() - start, 1)

    def train(arm: str, steps: int, init: Path, out: Path) -> dict:
        acfg = load_config(args.config, [*common, f"train.max_steps={steps}", f"train.save_every={steps}",
                                         *ARMS[arm]])
        start = time.perf_counter()
        run_training(acfg, base, out_dir=out, init_from=init, weights={}, num_steps=steps,
                     lr_at=schedule_from_config(acfg.train, steps), save_at=set())
        records = read_metrics(out / "metrics.jsonl")
        return {"final": out / "final", "train_s": round(time.perf_counter() - start, 1),
                "teacher_scored_tokens": records[-1]["tokens"],
                "student_samples": sum(r["student_samples"] for r in records),
                "teacher_samples": sum(r["teacher_samples"] for r in records)}

    start_from = base / "student_init"
    results: dict[str, dict] = {}
    if args.warm_steps > 0:
        results["warm_start"] = train(WARM_START, args.warm_steps, start_from, args.work / "warm_start")
        start_from = results["warm_start"]["final"]
    for arm in ARMS:
        results[arm] = train(arm, args.steps, start_from, args.work / arm)

    teacher = EvalModel(resolve_teacher(cfg.teacher.model, cfg.teacher.revision))
    rows = {"teacher": measure(None, teacher, args.limit, cfg.eval.batch_size),
            "init": measure(base / "student_init", teacher, args.limit, cfg.eval.batch_size)}
    for arm, info in results.items():
        rows[arm] = {**measure(info.pop("final"), teacher, args.limit, cfg.eval.batch_size), **info}
    summary = {"config": {"file": str(args.config), "steps": args.steps, "warm_steps": args.warm_steps,
                          "limit": args.limit,
                          "student": cfg.student.size, "batch_size": cfg.train.batch_size,
                          "max_new_tokens": cfg.train.max_new_tokens, "top_k": cfg.capture.top_k,
                          "lr": cfg.train.lr, "prompts": cfg.train.prompts, "overrides": args.overrides},
               "results": rows, "timings_s": timings, "cpus": os.cpu_count()}
    print(f"warm start: {args.warm_steps} SFT steps; each arm: {args.steps} steps × {cfg.train.batch_size} "
          f"prompts; held-out prompts: {args.limit}")
    print("| model | KL(student‖teacher) on own samples, nats/token | arithmetic acc | teacher-scored tokens |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['kl_to_teacher_on_policy']:.4f} | {row['arith_acc']:.3f} | "
              f"{row.get('teacher_scored_tokens', '—')} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
