"""The `anneal` stage (Llama 3 §3.1.3): a short final phase with the LR linearly annealed to 0 while
high-quality domains (math, code) are upsampled, then the checkpoints saved during it are averaged.

Plan (all derived from the config and the main run, so the stage is a pure function of its inputs):
- **start**: the main run's last checkpoint (`RUN/train/checkpoints/step-N`), or any checkpoint or HF folder
  passed as `init_from`. From a trainer checkpoint the phase continues the optimizer moments and the data
  position (each domain's place in its shuffled order, see distill/mixture.py): the checkpoint is copied as
  `anneal/checkpoints/step-000000` and the training loop resumes from it. From a bare HF folder it starts
  with a fresh optimizer.
- **length**: the phase covers the share `f = anneal.fraction` of the total token budget, so with M main
  steps it runs `round(M · f / (1 − f))` steps at the same batch size.
- **data**: the main domain weights × `anneal.upsample` factors, renormalised.
- **LR**: `lr(s) = lr0 · (1 − s / S)` for s = 0 … S−1: linear from where the main schedule stands (`lr0`, the
  LR of the checkpoint's last step, or `anneal.start_lr`) towards 0 at the end of the phase.
- **checkpoints**: `anneal.num_checkpoints` steps evenly spaced over the last `anneal.average_window` of the
  phase, the last at S; `averaged/` is their uniform average (or an EMA-weighted one).
- **final/**: whichever of `averaged/` and the last checkpoint has the lower in-distribution held-out loss
  (the run's validation rows, never benchmark scores); the last checkpoint when averaging is off. The
  report and the manifest (`final_choice`) say which and by how much.
- **report** (evaluation/anneal_report.py): per-domain held-out loss (nats/token) and KL(teacher ‖ student)
  for the model before annealing, every annealing checkpoint and the averaged model (`report.md`,
  `report.png`, `report.json`).

Works for both objectives (`train.objective` kd or ce): the loop is distill/trainer.py's `run_training`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.artifacts import (
    TOKENIZER_FILES,
    ArtifactError,
    atomic_dir,
    atomic_write_json,
    is_complete,
    read_manifest,
    write_manifest,
)
from core.checkpoint import STATE_FILE, checkpoint_dir, latest_checkpoint, list_checkpoints
from core.config import RunConfig, to_dict
from core.packed import PackedRows
from distill.averaging import average_checkpoints, ema_weights
from distill.mixture import domain_weights, mix_error, realised_mix, replay, upsampled_weights
from distill.schedule import schedule_from_config
from distill.trainer import default_num_steps, run_training
from evaluation.anneal_report import evaluate_checkpoints, write_anneal_report

PHASE_START = "phase_start.json"  # the data position the phase started from
AVERAGED = "averaged"  # the checkpoint average, published as final/ when its held-out loss is the lower
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------


def anneal_steps(main_steps: int, fraction: float) -> int:
    """Steps of an annealing phase that is `fraction` of the total budget after `main_steps` main steps."""
    if main_steps <= 0:
        raise ValueError(f"anneal: the main run has {main_steps} steps; nothing to anneal from")
    return max(1, round(main_steps * fraction / (1.0 - fraction)))


def checkpoint_steps(num_steps: int, num_checkpoints: int, window: float = 1.0) -> list[int]:
    """`num_checkpoints` distinct steps evenly spaced over the last `window` share of 1 … num_steps (at least
    as many steps as checkpoints), the last one = num_steps.

    Averaging pays off once the iterates hover around one basin — late in the LR decay — and hurts while
    the loss is still falling fast, hence the window."""
    k = max(1, min(num_checkpoints, num_steps))
    span = min(num_steps, max(k, round(window * num_steps)))
    start = num_steps - span
    return [start + round(span * (i + 1) / k) for i in range(k)]


def linear_to_zero(start_lr: float, num_steps: int) -> Callable[[int], float]:
    """`lr_at(step)` = start_lr · (1 − step / num_steps) for step 0 … num_steps − 1."""
    if num_steps <= 0:
        raise ValueError(f"anneal: num_steps must be > 0, got {num_steps}")
    if start_lr <= 0:
        raise ValueError(f"anneal: the starting LR must be > 0, got {start_lr!r} (set anneal.start_lr)")

    def lr_at(step: int) -> float:
        if not 0 <= step < num_steps:
            raise ValueError(f"anneal lr: step {step} outside 0..{num_steps - 1}")
        return start_lr * (1.0 - step / num_steps)

    return lr_at


def _is_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / "optimizer.pt").is_file()


def _start_point(cfg: RunConfig, run_dir: Path, init_from: Path | None,
                 data_manifest: dict[str, Any]) -> tuple[Path, int, float]:
    """(model folder to start from, main-run steps, LR where the main schedule stands)."""

    train_dir = run_dir / "train"
    if init_from is None:
        if not is_complete(train_dir, "train"):
            raise ArtifactError(f"{train_dir}: no completed train stage — run `distill train` first, or pass a "
                                "checkpoint to start from")
        init_from = latest_checkpoint(train_dir)
        if init_from is None:
            raise ArtifactError(f"{train_dir}/checkpoints: no checkpoint to anneal from")
    init_from = Path(init_from)
    if not (init_from / "config.json").is_file():
        raise ArtifactError(f"{init_from}: not a model folder or trainer checkpoint (no config.json)")
    if _is_checkpoint(init_from):
        state = json.loads((init_from / STATE_FILE).read_text())
        main_steps, lr = int(state["step"]), float(state["lr"])
    else:
        if is_complete(train_dir, "train"):
            main_steps = int(read_manifest(train_dir, "train")["num_steps"])
        else:
            from accelerate import PartialState

            main_steps = default_num_steps(cfg, int(data_manifest["num_train"]), PartialState().num_processes)
        lr = schedule_from_config(cfg.train, main_steps)(main_steps - 1)  # the main schedule's last LR
    if cfg.anneal.start_lr > 0:
        lr = cfg.anneal.start_lr
    return init_from, main_steps, lr


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def continue_from_checkpoint(checkpoint: Path, out_dir: Path, num_steps: int, lr: float) -> Path | None:
    """Make `checkpoint` (a trainer checkpoint) step 0 of a new phase in `out_dir`, so the training loop
    resumes its optimizer moments, data position and RNG state. Files are hard-linked where possible.
    Does nothing (returns None) when `out_dir` already has checkpoints (the phase is being resumed)."""
    if list_checkpoints(out_dir):
        return None
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    state.update({"step": 0, "num_steps": num_steps, "lr": lr, "continued_from": str(checkpoint)})
    target = checkpoint_dir(out_dir, 0)
    with atomic_dir(target) as tmp:
        for item in Path(checkpoint).iterdir():
            if item.is_dir():  # dcp/: the sharded state of an FSDP checkpoint
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            elif item.name != STATE_FILE:
                _link_or_copy(item, tmp / item.name)
        atomic_write_json(tmp / STATE_FILE, state)
    # Kept outside checkpoints/ (which the loop prunes) for the phase's realised-mix report.
    atomic_write_json(Path(out_dir) / PHASE_START, {"checkpoint": str(checkpoint), "ranks": state["ranks"]})
    return target


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


@dataclass
class AnnealPlan:
    """The phase, derived from the config and the main run (see the module docstring)."""

    start: Path  # the trainer checkpoint or HF folder the phase starts from
    main_steps: int
    start_lr: float
    num_steps: int
    main_weights: dict[str, float]
    weights: dict[str, float]  # main weights × anneal.upsample, renormalised
    save_at: list[int]  # the steps whose checkpoints are averaged


def plan_phase(cfg: RunConfig, run_dir: Path, init_from: Path | None, data_manifest: dict[str, Any]) -> AnnealPlan:
    start, main_steps, start_lr = _start_point(cfg, run_dir, init_from, data_manifest)
    num_steps = anneal_steps(main_steps, cfg.anneal.fraction)
    main_weights = domain_weights(cfg, data_manifest)
    return AnnealPlan(start, main_steps, start_lr, num_steps, main_weights,
                      upsampled_weights(main_weights, cfg.anneal.upsample),
                      checkpoint_steps(num_steps, cfg.anneal.num_checkpoints, cfg.anneal.average_window))


def anneal(cfg: RunConfig, run_dir: Path, init_from: Path | None = None) -> Path:
    """The `anneal` stage → `RUN/anneal/` (checkpoints/, final/, report.md/.png/.json, metrics, manifest).

    `init_from`: a trainer checkpoint or HF folder to start from (default: the train stage's last
    checkpoint). Resumes an interrupted phase; returns at once if the stage is complete."""
    from accelerate import PartialState

    run_dir = Path(run_dir)
    out_dir = run_dir / "anneal"
    if is_complete(out_dir, "anneal"):
        return out_dir
    data_manifest = read_manifest(run_dir / "data", "data")
    plan = plan_phase(cfg, run_dir, init_from, data_manifest)
    state = PartialState()
    if _is_checkpoint(plan.start) and state.is_main_process:
        continue_from_checkpoint(plan.start, out_dir, plan.num_steps, plan.start_lr)
    state.wait_for_everyone()
    print(f"anneal: {plan.num_steps} steps after {plan.main_steps} main steps (fraction {cfg.anneal.fraction}), "
          f"LR {plan.start_lr:.3g} → 0, weights {_fmt_weights(plan.main_weights)} → {_fmt_weights(plan.weights)}, "
          f"checkpoints at {plan.save_at}")
    run_training(cfg, run_dir, out_dir=out_dir, init_from=plan.start, weights=plan.weights,
                 num_steps=plan.num_steps, lr_at=linear_to_zero(plan.start_lr, plan.num_steps),
                 save_at=set(plan.save_at))
    if state.is_main_process:
        _finish(cfg, run_dir, plan, data_manifest, from_train_stage=init_from is None)
    state.wait_for_everyone()
    return out_dir


def _finish(cfg: RunConfig, run_dir: Path, plan: AnnealPlan, data_manifest: dict[str, Any],
            from_train_stage: bool) -> None:
    """After the loop (main process): the checkpoint average, the realised mix, the report, final/ and the
    manifest."""
    out_dir, data_dir = run_dir / "anneal", run_dir / "data"
    checkpoints = [checkpoint_dir(out_dir, s) for s in plan.save_at]
    averaged = cfg.anneal.average and len(checkpoints) > 1
    if averaged:
        decay = cfg.anneal.ema_decay
        # run_training's final/ has the tokenizer (checkpoints hold weights and config only).
        average_checkpoints(checkpoints, out_dir / AVERAGED, weights=ema_weights(len(checkpoints), decay)
                            if decay > 0 else None, tokenizer_from=out_dir / "final")
    mix = phase_mix(cfg, data_dir, data_manifest, out_dir, plan.weights, checkpoints[-1])
    print(f"anneal: realised mix {_fmt_weights(mix)} (target {_fmt_weights(plan.weights)}, "
          f"max deviation {mix_error(mix, plan.weights):.3f})")
    models = {"before": plan.start, **{f"step {s}": p for s, p in zip(plan.save_at, checkpoints, strict=True)}}
    if averaged:
        models["averaged"] = out_dir / AVERAGED
    report = evaluate_checkpoints(cfg, data_dir, models)
    report["final_choice"] = choose_final(report) if averaged else {"chosen": "last", "reason": "no average"}
    if averaged:
        _install_final(report["final_choice"], checkpoints[-1], out_dir)
    summary = {"main_steps": plan.main_steps, "num_steps": plan.num_steps, "start_lr": plan.start_lr,
               "weights": plan.weights, "main_weights": plan.main_weights, "realised_mix": mix}
    write_anneal_report({**report, **summary, "objective": cfg.train.objective}, out_dir)
    inputs = {"data": data_dir}
    if from_train_stage:
        inputs["train"] = run_dir / "train"
    if cfg.train.reads_logit_store:
        inputs["logits"] = run_dir / "logits"
    write_manifest(out_dir, "anneal", config=to_dict(cfg.anneal), teacher=data_manifest.get("teacher"),
                   inputs=inputs, init_from=str(plan.start), **summary, checkpoints=[p.name for p in checkpoints],
                   averaged=averaged, final="final", final_choice=report["final_choice"])


def choose_final(report: dict[str, Any]) -> dict[str, Any]:
    """Which of the averaged model and the last annealing checkpoint becomes final/: the one with the lower
    in-distribution held-out loss over all tokens (validation data, never benchmark scores).

    Returns {"chosen": "averaged" | "last", "last": its report name, "loss": {"averaged", "last"} (nats/token
    over all held-out tokens), "delta": averaged − last}."""
    models, tokens = report["models"], report["tokens"]
    last = [name for name in models if name.startswith("step ")][-1]
    total = sum(tokens[d] for d in report["domains"])

    def loss(name: str) -> float:
        return sum(models[name][d]["loss"] * tokens[d] for d in report["domains"]) / total

    averaged, final = loss("averaged"), loss(last)
    return {"chosen": "averaged" if averaged <= final else "last", "last": last,
            "loss": {"averaged": averaged, "last": final}, "delta": averaged - final}


def _install_final(choice: dict[str, Any], last_checkpoint: Path, out_dir: Path) -> None:
    """Make `out_dir/final` the chosen model: the averaged folder, or the last checkpoint's weights and
    config with the tokenizer. Rebuilt from its source every time, so a stage resumed after a crash here
    ends with the same final/ whichever it held before."""
    averaged = out_dir / AVERAGED
    with atomic_dir(out_dir / "final") as tmp:
        if choice["chosen"] == "averaged":
            for item in averaged.iterdir():
                shutil.copy2(item, tmp / item.name)
            return
        for item in last_checkpoint.iterdir():
            if item.suffix == ".safetensors" or item.name in _MODEL_FILES:
                shutil.copy2(item, tmp / item.name)
        for name in TOKENIZER_FILES:
            if (averaged / name).is_file():
                shutil.copy2(averaged / name, tmp / name)


def phase_mix(cfg: RunConfig, data_dir: Path, data_manifest: dict[str, Any], out_dir: Path,
              weights: dict[str, float], last_checkpoint: Path) -> dict[str, float]:
    """The realised domain mix of the whole phase (all ranks): the draws between the data position it
    started from (`phase_start.json`; none: a fresh sampler) and its last checkpoint's, replayed from the seed."""
    first = Path(out_dir) / PHASE_START
    start = json.loads(first.read_text())["ranks"][0]["sampler"] if first.is_file() else None
    end = json.loads((last_checkpoint / STATE_FILE).read_text())["ranks"][0]["sampler"]
    domains = PackedRows(data_dir).domain.astype("int64")
    names = list(data_manifest["domains"])
    return realised_mix(replay(domains, names, weights, cfg.train.seed, start, end), domains, names)


def _fmt_weights(weights: dict[str, float]) -> str:
    return "{" + ", ".join(f"{d}: {w:.2f}" for d, w in weights.items()) + "}"
