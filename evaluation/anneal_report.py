"""The annealing stage's report (`RUN/anneal/report.md`, `.png`, `.json`): per-domain held-out loss and
KL(teacher ‖ student) of the model before annealing, each annealing checkpoint and their average, on the run's
in-distribution held-out rows, and which of average and last checkpoint became final/ (distill/anneal.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.artifacts import ArtifactError, atomic_write_json, atomic_write_text
from core.config import RunConfig
from evaluation.intrinsic import HeldOut, intrinsic_metrics, load_heldout
from evaluation.plots import pyplot, save_png
from teachers.resolve import load_model, resolve_teacher


def evaluate_checkpoints(cfg: RunConfig, data_dir: Path, models: dict[str, Path]) -> dict[str, Any]:
    """Per-domain held-out loss (mean NLL per target token, nats) and KL(teacher ‖ student) (nats/token)
    of each model folder, on `data_dir/heldout.safetensors`, against the run's teacher.

    Returns {"domains": [...], "tokens": {domain: n}, "models": {name: {domain: {"loss", "kl"}}}}."""


    heldout = load_heldout(Path(data_dir) / "heldout.safetensors")
    subsets = {}
    for j, domain in enumerate(heldout.domains):
        sel = heldout.domain == j
        if bool(sel.any()):
            subsets[domain] = HeldOut(heldout.input_ids[sel], heldout.position_ids[sel], heldout.loss_mask[sel],
                                      torch.zeros(int(sel.sum()), dtype=torch.long), [domain])
    if not subsets:
        raise ArtifactError(f"{data_dir}/heldout.safetensors: no held-out rows to evaluate on")
    device = cfg.teacher.device if cfg.teacher.backend == "transformers" else "auto"
    teacher = load_model(resolve_teacher(cfg.teacher.model, cfg.teacher.revision), device=device)
    teacher_hidden: dict[str, dict] = {d: {} for d in subsets}  # the teacher runs once per domain
    results: dict[str, dict[str, dict[str, float]]] = {}
    tokens: dict[str, int] = {}
    for name, folder in models.items():
        model = load_model(folder, device=device)
        results[name] = {}
        for domain, sub in subsets.items():
            metrics, n = intrinsic_metrics(model, teacher, sub, batch_size=cfg.eval.batch_size,
                                           teacher_hidden=teacher_hidden[domain])
            results[name][domain] = {"loss": math.log(metrics[f"ppl_{domain}"]), "kl": metrics["kl_to_teacher"]}
            tokens[domain] = n
        del model
    return {"domains": list(subsets), "tokens": tokens, "models": results,
            "model_paths": {k: str(v) for k, v in models.items()}}


def choice_sentence(choice: dict[str, Any]) -> str:
    """One Markdown sentence: which model final/ is and by how much its held-out loss is lower."""
    chosen, other = ("averaged", "last") if choice["chosen"] == "averaged" else ("last", "averaged")
    names = {"averaged": "the checkpoint average", "last": f"the last checkpoint ({choice['last']})"}
    return (f"**final/ = {names[chosen]}**: held-out loss {choice['loss'][chosen]:.4f} nats/token vs "
            f"{choice['loss'][other]:.4f} for {names[other]} ({abs(choice['delta']):.4f} lower), chosen on the "
            "in-distribution held-out rows, never on benchmark scores.")


def report_markdown(report: dict[str, Any]) -> str:
    domains = report["domains"]
    lines = [
        "# Annealing report",
        "",
        f"{report.get('num_steps', '?')} annealing steps after {report.get('main_steps', '?')} main steps, "
        f"objective `{report.get('objective', '?')}`, LR {report.get('start_lr', 0):.3g} → 0 (linear).",
        "",
        "Domain weights: " + ", ".join(
            f"{d} {report.get('main_weights', {}).get(d, 0):.2f} → {report.get('weights', {}).get(d, 0):.2f}"
            for d in domains) + "; realised over the phase: " + ", ".join(
            f"{d} {report.get('realised_mix', {}).get(d, 0):.2f}" for d in domains) + ".",
        "",
        "Held-out loss (nats/token, lower is better) and KL(teacher ‖ student) (nats/token) per domain; "
        "held-out tokens: " + ", ".join(f"{d} {report['tokens'][d]}" for d in domains) + ".",
        "",
        "| model | " + " | ".join(f"loss {d}" for d in domains) + " | " + " | ".join(f"KL {d}" for d in domains) + " |",
        "|---" * (1 + 2 * len(domains)) + "|",
    ]
    for name, per in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per[d]['loss']:.4f}" for d in domains) + " | "
                     + " | ".join(f"{per[d]['kl']:.4f}" for d in domains) + " |")
    models = report["models"]
    if "averaged" in models:
        last = [name for name in models if name.startswith("step ")][-1]
        delta = {d: models["averaged"][d]["loss"] - models[last][d]["loss"] for d in domains}
        overall = sum(delta[d] * report["tokens"][d] for d in domains) / sum(report["tokens"][d] for d in domains)
        lines += ["", f"Averaged − last checkpoint ({last}), held-out loss: "
                  + ", ".join(f"{d} {delta[d]:+.4f}" for d in domains) + f"; all tokens {overall:+.4f} nats/token."]
        if overall > 0:
            # An average lags a model that is still improving fast (benchmarks/annealing.py: short vs long main runs).
            lines.append("Averaging did worse than the last checkpoint: the model was still improving fast during "
                         "the phase, so the average lags behind it. It pays once the main run has levelled off: "
                         "train longer, or narrow `anneal.average_window`, or set `anneal.average: false`.")
    if "loss" in report.get("final_choice", {}):
        lines += ["", choice_sentence(report["final_choice"])]
    return "\n".join(lines) + "\n"


def plot_anneal_report(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: per domain, the loss and KL of each evaluated model."""
    plt = pyplot()
    domains, names = report["domains"], list(report["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "loss", "held-out loss (nats/token)"), (axes[1], "kl", "KL(teacher ‖ student)")):
        for i, name in enumerate(names):
            vals = [report["models"][name][d][key] for d in domains]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.set_xticks(x, domains)
        ax.set_title(title)
        low = min(report["models"][n][d][key] for n in names for d in domains)
        ax.set_ylim(bottom=max(0.0, low * 0.9))  # differences are small relative to the values
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def write_anneal_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    plot_anneal_report(report, out_dir / "report.png")
