"""Benchmark: does the Llama-3 annealing stage (LR linear to 0, math and code upsampled, checkpoint averaging)
lower math and code held-out loss compared with spending the same tokens on the unchanged mix and schedule?

One main run, then three arms of the same length, all continuing from the main run's last checkpoint
(optimizer moments and data position included):

- `anneal`:          upsampled weights (math, code ×k), LR linear to 0 — the `distill anneal` stage itself;
- `continue`:        the main mix, the main schedule continued (constant LR: the main run is the stable phase
                     of a warmup-stable-decay schedule) — the control the issue asks for;
- `decay-only`:      the main mix, LR linear to 0 — separates the LR decay's effect from the mix's.

Every model is evaluated on the run's held-out split per domain (loss in nats/token and KL to the teacher).

The main run is long enough (600 steps of 8 × 128 tokens, about 1.5 passes over the 400k training tokens) for its
loss to level off at its LR: averaging checkpoints removes noise from a model that is no longer improving
fast. After a short main run (`--main-steps 160`) the model still improves quickly all through the phase and
the average lags behind the last checkpoint (0.008-0.033 nats/token worse, measured).
Writes OUT/bench/annealing.{json,md,png} next to the run's RUN/anneal/report.*.

    .venv/bin/python benchmarks/annealing.py --output-dir runs/bench-annealing [--main-steps 600]

Defaults: the embedded SmolLM2-135M-Instruct as the teacher (tokenizer, KL reference), the `tiny-2l` student
from scratch, objective `ce` (the teacher is only needed for evaluation, which keeps the benchmark CPU-sized;
the stage itself runs the same code for `kd`, see tests/distill/test_anneal.py).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

from core.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text, read_manifest
from core.checkpoint import checkpoint_dir, latest_checkpoint
from core.config import load_config
from distill.anneal import anneal, anneal_steps, continue_from_checkpoint, linear_to_zero
from distill.averaging import average_checkpoints, ema_weights
from distill.mixture import domain_weights
from evaluation.anneal_report import evaluate_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def build_config(args: argparse.Namespace):
    overrides = [
        f"teacher.model={args.teacher}",
        f"student.size={args.student}", "student.init=scratch",
        "data.seq_len=128", f"data.train_tokens={args.train_tokens}",
        f"data.heldout_sequences_per_domain={args.heldout}",
        f"train.objective={args.objective}", "train.schedule=constant", f"train.lr={args.lr}", "train.warmup_steps=20",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.main_steps}", "train.save_every=0",
        "train.log_every=20", "train.teacher_source=online",
        "anneal.enabled=true", f"anneal.fraction={args.fraction}",
        f"anneal.upsample={{math: {args.upsample}, code: {args.upsample}}}",
        f"anneal.num_checkpoints={args.checkpoints}",
        f"anneal.average_window={args.window}",
        "eval.batch_size=8",
    ]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def run_arm(cfg, run_dir: Path, out_dir: Path, start: Path, weights: dict[str, float], num_steps: int,
            lr_at, save_at: set[int]) -> Path:
    from distill.trainer import run_training

    state = json.loads((start / "trainer_state.json").read_text())
    continue_from_checkpoint(start, out_dir, num_steps, float(state["lr"]))
    run_training(cfg, run_dir, out_dir=out_dir, init_from=start, weights=weights, num_steps=num_steps,
                 lr_at=lr_at, save_at=save_at)
    return checkpoint_dir(out_dir, num_steps)


def summary_markdown(result: dict) -> str:
    domains = result["domains"]
    models = result["models"]
    rows = ["| model | " + " | ".join(f"loss {d}" for d in domains) + " | "
            + " | ".join(f"KL {d}" for d in domains) + " |",
            "|---" * (1 + 2 * len(domains)) + "|"]
    for name, per in models.items():
        rows.append(f"| {name} | " + " | ".join(f"{per[d]['loss']:.4f}" for d in domains) + " | "
                    + " | ".join(f"{per[d]['kl']:.4f}" for d in domains) + " |")
    deltas = []
    averaged = next(name for name in models if name.startswith("anneal: averaged ("))
    for d in domains:
        a, c = models["anneal: last"][d]["loss"], models["continue: last"][d]["loss"]
        deltas.append(f"| {d} | {c:.4f} | {models['decay-only: last'][d]['loss']:.4f} | {a:.4f} | {a - c:+.4f} | "
                      f"{models[averaged][d]['loss'] - a:+.4f} |")
    return "\n".join([
        "# Annealing benchmark",
        "",
        f"Main run: {result['main_steps']} steps; each arm: {result['arm_steps']} steps "
        f"({result['fraction']:.0%} of the total budget), batch {result['batch_size']} × {result['seq_len']} tokens, "
        f"objective `{result['objective']}`, student `{result['student']}`, teacher `{result['teacher']}`.",
        f"Main weights {result['main_weights']}; anneal weights {result['anneal_weights']}; "
        f"LR at the end of the main run {result['start_lr']:.3g}.",
        "",
        "Held-out loss (nats/token) and KL(teacher ‖ student) per domain:",
        "",
        *rows,
        "",
        "Held-out loss per domain: continue (control) vs decay-only vs anneal, and what averaging adds:",
        "",
        "| domain | continue | decay-only | anneal last | anneal − continue | averaged − anneal last |",
        "|---|---|---|---|---|---|",
        *deltas,
        "",
        f"Wall time: {result['wall_s']:.0f} s.",
    ]) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Differences to the control make 0.01-nat effects visible next to domain losses of 4 to 7 nats.
    control = "continue: last"
    domains = result["domains"]
    names = [n for n in result["models"] if n not in (control, "before (main run)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "loss", "held-out loss − control (nats/token)"),
                           (axes[1], "kl", "KL(teacher ‖ student) − control")):
        for i, name in enumerate(names):
            delta = [result["models"][name][d][key] - result["models"][control][d][key] for d in domains]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, delta, width, label=name)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, domains)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['arm_steps']} steps after {result['main_steps']} main steps, vs the control "
                 "(same steps, unchanged mix, constant LR); below 0 is better")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "bench-annealing")
    parser.add_argument("--teacher", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--student", default="tiny-2l")
    parser.add_argument("--objective", default="ce", choices=["ce", "kd"])
    parser.add_argument("--main-steps", type=int, default=600)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--upsample", type=float, default=3.0)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--window", type=float, default=0.5, help="anneal.average_window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-tokens", type=int, default=400_000)
    parser.add_argument("--heldout", type=int, default=16, help="held-out rows per domain")
    args = parser.parse_args()

    from distill.data import build_data
    from distill.trainer import train
    from students.init import init_student

    started = time.perf_counter()
    run_dir = args.output_dir
    cfg = build_config(args)
    data_dir = build_data(cfg, run_dir)
    init_student(cfg, run_dir)
    train(cfg, run_dir)
    anneal_dir = anneal(cfg, run_dir)

    start = latest_checkpoint(run_dir / "train")
    main_state = json.loads((start / "trainer_state.json").read_text())
    main_steps, start_lr = int(main_state["step"]), float(main_state["lr"])
    steps = anneal_steps(main_steps, cfg.anneal.fraction)
    main_weights = domain_weights(cfg, read_manifest(data_dir, "data"))
    bench = run_dir / "bench"
    cont = run_arm(cfg, run_dir, bench / "continue", start, main_weights, steps, lambda s: start_lr, set())
    decay = run_arm(cfg, run_dir, bench / "decay-only", start, main_weights, steps,
                    linear_to_zero(start_lr, steps), set())

    manifest = read_manifest(anneal_dir, "anneal")
    saved = [anneal_dir / "checkpoints" / name for name in manifest["checkpoints"]]
    # Averaging variants over the same checkpoints: only the newest two, and an EMA (decay 0.5 per checkpoint).
    avg_last2 = average_checkpoints(saved[-2:], bench / "avg-last2", tokenizer_from=anneal_dir / "final")
    ema = average_checkpoints(saved, bench / "ema-0.5", weights=ema_weights(len(saved), 0.5),
                              tokenizer_from=anneal_dir / "final")
    models = {"before (main run)": start, "continue: last": cont, "decay-only: last": decay,
              "anneal: last": saved[-1], f"anneal: averaged ({len(saved)})": anneal_dir / "final",
              "anneal: averaged (last 2)": avg_last2, "anneal: EMA 0.5": ema}
    evaluated = evaluate_checkpoints(cfg, data_dir, models)
    result = {
        "domains": evaluated["domains"], "tokens": evaluated["tokens"], "models": evaluated["models"],
        "main_steps": main_steps, "arm_steps": steps, "fraction": cfg.anneal.fraction, "start_lr": start_lr,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "objective": cfg.train.objective,
        "student": cfg.student.size, "teacher": cfg.teacher.model,
        "main_weights": {k: round(v, 3) for k, v in main_weights.items()},
        "anneal_weights": {k: round(v, 3) for k, v in manifest["weights"].items()},
        "anneal_realised_mix": manifest.get("realised_mix"),
        "wall_s": time.perf_counter() - started,
    }
    atomic_write_json(bench / "annealing.json", result)
    text = summary_markdown(result)
    atomic_write_text(bench / "annealing.md", text)
    plot(result, bench / "annealing.png")
    print(text)
    print(f"→ {bench}/annealing.md, annealing.png; stage report {anneal_dir}/report.md")


if __name__ == "__main__":
    main()
