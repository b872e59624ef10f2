"""The stages of a distillation run, in order, and how `distill run` decides which to (re)run.

Each stage is a function `(cfg, run_dir) -> Path` that returns at once when its folder already holds a
complete manifest and otherwise resumes from whatever it left behind (see docs/ARCHITECTURE.md).

Make-like reruns: a stage's *fingerprint* is what determines its output — the config values it reads
(`Stage.reads`; settings that only move float rounding or speed stay out), the manifest hashes of the
artifacts it reads (`Stage.inputs`) and the package versions. `plan` compares each stage's fingerprint with
the one recorded in its manifest (stamped by `run_plan` when the stage completes) and with the one of an
unfinished attempt (`RUN/.fingerprints/<stage>.json`, written when it starts): a stage whose fingerprint
changed is recomputed, and so is everything downstream of it. Discarding a finished synth, data or capture
artifact (hours of teacher time at scale) needs `--rerun STAGE`; without it the run stops before doing
anything and says so. `RUN/config.yaml` is written once the planned stages have all completed, so it never
claims settings that no output was made with.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.artifacts import (
    atomic_write_json,
    atomic_write_text,
    is_complete,
    manifest_hash,
    package_versions,
    read_manifest,
)
from core.config import InputError, RunConfig, load_config, to_dict
from distill.anneal import anneal
from distill.data import build_data
from distill.trainer import cpu_only, train
from evaluation.suite import evaluate_run
from students.init import init_student
from students.publish import publish_run
from synth_data.pipeline import synthesize
from teachers.capture import capture

# ---------------------------------------------------------------------------------------------------
# What each stage reads
# ---------------------------------------------------------------------------------------------------


def _section(cfg: RunConfig, name: str, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f"{name}.{k}": v for k, v in to_dict(getattr(cfg, name)).items() if k not in leave_out}


def _teacher(cfg: RunConfig, *fields: str) -> dict[str, Any]:
    return {f"teacher.{k}": getattr(cfg.teacher, k) for k in ("model", "revision", *fields)}


# Logging, checkpoint cadence and retention do not change the trained weights.
_TRAIN_BOOKKEEPING = ("log_every", "save_every", "keep_last")


def _train_reads(cfg: RunConfig) -> dict[str, Any]:
    reads = _section(cfg, "train", _TRAIN_BOOKKEEPING)
    if not cfg.train.reads_logit_store and cfg.train.objective != "ce":  # a teacher in the loop
        reads |= _teacher(cfg, "backend", "dtype", "server_url") | {"capture.top_k": cfg.capture.top_k}
    return reads


def _data_reads(cfg: RunConfig) -> dict[str, Any]:
    """The data config, plus the size and modification time of each local source file, so a source edited
    in place (same path, other text) reruns the stage. Hub ids are pinned by their config alone."""
    reads = _section(cfg, "data", ("num_proc",)) | _teacher(cfg)
    for i, src in enumerate(cfg.data.sources):
        if src.kind in ("jsonl", "text_files", "hf") and src.path:
            files = sorted(glob.glob(src.path, recursive=True)) if src.kind == "text_files" else [src.path]
            stats = [os.stat(f) for f in files if os.path.isfile(f)]
            if stats:
                reads[f"data.sources[{i}].files"] = [[s.st_size, s.st_mtime_ns] for s in stats]
    return reads


def _final_stage(cfg: RunConfig) -> str:
    return "anneal" if cfg.anneal.enabled else "train"


def _uses_synth(cfg: RunConfig) -> bool:
    return cfg.synth.enabled and any(s.kind == "synth" and not s.path for s in cfg.data.sources)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: `run` writes `RUN/<folder>` (manifest stage name `name`)."""

    name: str
    folder: str
    run: Callable[[RunConfig, Path], Path]
    reads: Callable[[RunConfig], dict[str, Any]]  # the config values that determine the output
    inputs: Callable[[RunConfig], list[str]]  # the stages whose artifacts it reads
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    expensive: bool = False  # discarding a finished one needs --rerun


STAGES: list[Stage] = [
    Stage("synth", "synth", synthesize, lambda c: _section(c, "synth", ("enabled",)) | _teacher(c, "backend", "dtype"),
          lambda c: [], lambda c: c.synth.enabled, expensive=True),
    Stage("data", "data", build_data, _data_reads,
          lambda c: ["synth"] if _uses_synth(c) else [], expensive=True),
    Stage("capture", "logits", capture, lambda c: _section(c, "capture") | _teacher(c, "backend", "dtype"),
          lambda c: ["data"], lambda c: c.train.reads_logit_store, expensive=True),
    Stage("student", "student_init", init_student, lambda c: _section(c, "student") | _teacher(c),
          lambda c: ["data"]),
    Stage("train", "train", train, _train_reads,
          lambda c: ["data", "student"] + (["capture"] if c.train.reads_logit_store else [])),
    Stage("anneal", "anneal", anneal, lambda c: _section(c, "anneal") | _train_reads(c),
          lambda c: ["train", "data"] + (["capture"] if c.train.reads_logit_store else []), lambda c: c.anneal.enabled),
    Stage("eval", "eval", evaluate_run, lambda c: _section(c, "eval") | _teacher(c, "backend", "dtype"),
          lambda c: [_final_stage(c), "data"]),
    Stage("publish", "publish", publish_run, lambda c: _section(c, "publish", ("push_to_hub",)),
          lambda c: [_final_stage(c), "eval"]),
]
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}
STARTED = ".fingerprints"  # RUN/.fingerprints/<stage>.json: the fingerprint of the attempt in progress
UNSTAMPED = "no fingerprint recorded"


def fingerprint(stage: Stage, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """{"reads": {dotted field: value}, "inputs": {stage: manifest hash or None}, "versions": {...}}."""
    inputs = {}
    for name in stage.inputs(cfg):
        folder = run_dir / BY_NAME[name].folder
        inputs[name] = manifest_hash(folder) if is_complete(folder, name) else None
    reads = json.loads(json.dumps(stage.reads(cfg), default=str))  # JSON values, as stored
    return {"reads": reads, "inputs": inputs, "versions": package_versions()}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'train.lr 0.0005 → 0.001, input data changed' — what differs between two fingerprints."""
    parts = []
    for key in sorted(old.get("reads", {}).keys() | new["reads"].keys()):
        a, b = old.get("reads", {}).get(key, "∅"), new["reads"].get(key, "∅")
        if a != b:
            parts.append(f"{key} {a} → {b}")
    parts += [f"input {name} changed" for name in new["inputs"]
              if old.get("inputs", {}).get(name) != new["inputs"][name]]
    parts += [f"{pkg} {old.get('versions', {}).get(pkg, '∅')} → {v}" for pkg, v in new["versions"].items()
              if old.get("versions", {}).get(pkg) != v]
    return ", ".join(parts) or "fingerprint changed"


# ---------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------


@dataclass
class Step:
    stage: Stage
    action: str  # "skip" | "run" (fresh or resume) | "rerun" (discard the output first)
    reason: str = ""
    downstream: list[str] = field(default_factory=list)  # the stages a rerun carries with it


def _stage_action(stage: Stage, cfg: RunConfig, run_dir: Path, carried: list[str],
                  rerun: set[str]) -> tuple[str, str]:
    folder = run_dir / stage.folder
    if stage.name in rerun:
        return "rerun", "--rerun"
    if carried:
        return "rerun", f"its input {', '.join(carried)} is recomputed"
    current = fingerprint(stage, cfg, run_dir)
    if is_complete(folder, stage.name):
        recorded = read_manifest(folder, stage.name).get("fingerprint")
        if recorded is None:  # made before fingerprints, or by a torchrun job outside `distill run`
            return "skip", UNSTAMPED
        if recorded == current:
            return "skip", ""
        return "rerun", describe_change(recorded, current)
    started_path = run_dir / STARTED / f"{stage.name}.json"
    if folder.exists() and started_path.is_file():
        started = json.loads(started_path.read_text())
        if started != current:
            return "rerun", f"unfinished, made with other settings: {describe_change(started, current)}"
    return "run", "resume" if folder.exists() else ""


def plan(cfg: RunConfig, run_dir: Path, rerun: set[str] = frozenset(), only: str | None = None,
         stop_after: str | None = None, check_expensive: bool = True) -> list[Step]:
    """What `distill run` (or, with `only`, one stage verb) will do, stage by stage."""
    unknown = set(rerun) - set(STAGE_NAMES)
    if unknown:
        raise InputError(f"--rerun: unknown stage {sorted(unknown)[0]!r} (stages: {', '.join(STAGE_NAMES)})")
    steps: list[Step] = []
    recomputed: set[str] = set()
    for stage in STAGES:
        if not stage.enabled(cfg) or (only is not None and stage.name != only):
            continue
        carried = [] if only else [name for name in stage.inputs(cfg) if name in recomputed]
        action, reason = _stage_action(stage, cfg, run_dir, carried, set(rerun))
        steps.append(Step(stage, action, reason))
        if action == "rerun":
            recomputed.add(stage.name)
        if stage.name == stop_after:
            break
    for step in steps:
        if step.action == "rerun" and not step.reason.startswith("its input"):
            step.downstream = [s.stage.name for s in steps if s.action == "rerun" and
                               _downstream_of(s.stage.name, step.stage.name, cfg)]
    if check_expensive:
        _refuse_discarding_expensive(steps, run_dir, set(rerun), cfg)
    return steps


def _downstream_of(name: str, root: str, cfg: RunConfig) -> bool:
    if name == root:
        return True
    return any(_downstream_of(parent, root, cfg) for parent in BY_NAME[name].inputs(cfg))


def _refuse_discarding_expensive(steps: list[Step], run_dir: Path, rerun: set[str], cfg: RunConfig) -> None:
    for step in steps:
        stage = step.stage
        asked = any(_downstream_of(stage.name, name, cfg) for name in rerun)
        if step.action == "rerun" and stage.expensive and not asked and (run_dir / stage.folder).exists():
            raise InputError(
                f"{stage.name}: {step.reason} — this would discard the {stage.name} artifact in "
                f"{run_dir / stage.folder}. Run again with `--rerun {stage.name}` to recompute it (and what "
                f"depends on it), or choose a new --output-dir")


def format_plan(steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        name = step.stage.name
        if step.action == "skip":
            lines.append(f"{name}: up to date")
        elif step.action == "run":
            lines.append(f"{name}: {'resumes' if step.reason == 'resume' else 'runs'}")
        elif step.downstream:
            lines.append(f"{name}: {step.reason} — reruns {', '.join(step.downstream)}")
        else:
            lines.append(f"{name}: reruns ({step.reason})")
    return lines


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def stamp(stage: Stage, cfg: RunConfig, run_dir: Path) -> None:
    """Record the fingerprint of a completed stage in its manifest (manifest_hash ignores it, so consumers'
    recorded hashes stay valid) and drop the in-progress record."""
    folder = run_dir / stage.folder
    manifest = read_manifest(folder, stage.name)
    current = fingerprint(stage, cfg, run_dir)
    if manifest.get("fingerprint") != current:
        atomic_write_json(folder / "manifest.json", {**manifest, "fingerprint": current})
    (run_dir / STARTED / f"{stage.name}.json").unlink(missing_ok=True)


def _discard(folder: Path) -> None:
    """Remove a stale output: renamed first, so a crash never leaves half of it looking complete."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{time.time_ns()}")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _prepare(step: Step, cfg: RunConfig, run_dir: Path) -> None:
    """Before a stage runs: discard a stale output; record the fingerprint of the attempt."""
    if step.action == "rerun":
        print(f"{step.stage.name}: rerun ({step.reason})", flush=True)
        _discard(run_dir / step.stage.folder)
        if step.stage.name == "data":
            _discard(run_dir / ".data.partial")
    if step.action != "skip":
        atomic_write_json(run_dir / STARTED / f"{step.stage.name}.json", fingerprint(step.stage, cfg, run_dir))


def run_in_every_process(names: list[str], cfg: RunConfig, run_dir: Path) -> None:
    """The stages `names` in a torchrun / accelerate job (every process calls this): the same plan, with the
    main process discarding stale outputs and recording fingerprints between barriers."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_only())
    for name in names:
        steps = plan(cfg, run_dir, only=name)
        state.wait_for_everyone()
        if state.is_main_process:
            _prepare(steps[0], cfg, run_dir)
        state.wait_for_everyone()
        print(BY_NAME[name].run(cfg, run_dir))
        if state.is_main_process and steps[0].reason != UNSTAMPED:
            stamp(BY_NAME[name], cfg, run_dir)
        state.wait_for_everyone()


def run_plan(steps: list[Step], cfg: RunConfig, run_dir: Path, verbose: bool = True,
             runners: dict[str, Callable[[RunConfig, Path], Path]] | None = None) -> dict[str, Path]:
    """Carry out a plan (`runners` replaces a stage's function, e.g. capture on Ray); returns each stage's
    output folder, then records the config (`record_config`)."""
    outputs: dict[str, Path] = {}
    for step in steps:
        stage = step.stage
        _prepare(step, cfg, run_dir)
        started = time.time()
        if verbose:
            print(f"=== {stage.name} ===", flush=True)
        # A skipped (complete) stage is still called: it returns at once after checking its files (data
        # and capture recompute a damaged shard), which is what makes an error's advice to rerun it work.
        outputs[stage.name] = (runners or {}).get(stage.name, stage.run)(cfg, run_dir)
        if step.reason != UNSTAMPED:
            stamp(stage, cfg, run_dir)
        if verbose:
            print(f"=== {stage.name} done in {time.time() - started:.0f}s → {outputs[stage.name]}", flush=True)
    record_config(cfg, run_dir)
    return outputs


def record_config(cfg: RunConfig, run_dir: Path) -> Path:
    """RUN/config.yaml: the config of the last command, headed by which stages' outputs it describes
    (their fingerprints match it) and which it does not yet (a later `distill run` recomputes those)."""
    made, not_made = [], []
    for step in plan(cfg, run_dir, check_expensive=False):
        (made if step.action == "skip" else not_made).append(step.stage.name)
    header = [f"# The config of the last `distill` command on this run. Outputs made with it: "
              f"{', '.join(made) or 'none yet'}."]
    if not_made:
        header.append(f"# Not (yet) made with it: {', '.join(not_made)} — `distill run` with this file "
                      "recomputes them.")
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def run_all(cfg: RunConfig, run_dir: Path, stop_after: str | None = None, rerun: set[str] = frozenset(),
            dry_run: bool = False) -> dict[str, Path]:
    """Run every enabled stage in order, recomputing what changed; returns each stage's output folder."""
    run_dir = Path(run_dir)
    steps = plan(cfg, run_dir, rerun, stop_after=stop_after)
    lines = format_plan(steps)
    if dry_run:
        print("\n".join(lines))
        return {}
    for line in lines:
        if ": up to date" not in line and ": runs" not in line:
            print(line, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_plan(steps, cfg, run_dir)


def run_stage(name: str, cfg: RunConfig, run_dir: Path, rerun: set[str] = frozenset(),
              runner: Callable[[RunConfig, Path], Path] | None = None) -> Path:
    """One stage (a CLI verb; `runner` replaces its function): recomputed if its own fingerprint changed."""
    run_dir = Path(run_dir)
    steps = plan(cfg, run_dir, rerun, only=name)
    if not steps:
        raise InputError(f"{name}: this stage is disabled by the config")
    for line in format_plan(steps):
        if ": up to date" not in line:
            print(line, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_plan(steps, cfg, run_dir, verbose=False, runners={name: runner} if runner else None)[name]


def launch(args: list[str]) -> int:
    """`python -m distill.trainer CONFIG RUN_DIR [key=value ...]` (under torchrun / accelerate launch) — the
    train stage, then the anneal stage when `anneal.enabled`, in every process of the job; like `distill run`,
    a stage whose fingerprint changed is recomputed."""
    if len(args) < 2:
        print("usage: python -m distill.trainer CONFIG RUN_DIR [section.key=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(args[0], args[2:])
    run_in_every_process(["train", "anneal"] if cfg.anneal.enabled else ["train"], cfg, Path(args[1]))
    return 0
