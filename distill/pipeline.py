"""The stages of a distillation run, in order, and `run_all` which chains them.

Each stage is a function `(cfg, run_dir) -> Path` that returns at once when its folder already holds a
complete manifest and otherwise resumes from whatever it left behind (see docs/ARCHITECTURE.md). That
makes `distill run` idempotent: rerunning after a crash redoes only the unfinished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.artifacts import atomic_write_text
from distill.config import RunConfig, to_dict


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, Path], Path]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True


def _data(cfg, run_dir):
    from distill.data import build_data

    return build_data(cfg, run_dir)


def _synth(cfg, run_dir):
    from synth_data.pipeline import synthesize

    return synthesize(cfg, run_dir)


def _capture(cfg, run_dir):
    from teachers.capture import capture

    return capture(cfg, run_dir)


def _student(cfg, run_dir):
    from students.init import init_student

    return init_student(cfg, run_dir)


def _train(cfg, run_dir):
    from distill.trainer import train

    return train(cfg, run_dir)


def _anneal(cfg, run_dir):
    from distill.anneal import anneal

    return anneal(cfg, run_dir)


def _eval(cfg, run_dir):
    from evaluation.suite import evaluate_run

    return evaluate_run(cfg, run_dir)


def _publish(cfg, run_dir):
    from students.publish import publish

    return publish(run_dir, verify_vllm=cfg.publish.verify_vllm, push_to_hub=cfg.publish.push_to_hub)


STAGES: list[Stage] = [
    Stage("synth", _synth, lambda cfg: cfg.synth.enabled),
    Stage("data", _data),
    Stage("capture", _capture, lambda cfg: cfg.train.objective == "kd" and cfg.train.teacher_source == "offline"),
    Stage("student", _student),
    Stage("train", _train),
    Stage("anneal", _anneal, lambda cfg: cfg.anneal.enabled),
    Stage("eval", _eval),
    Stage("publish", _publish),
]
STAGE_NAMES = [s.name for s in STAGES]


def record_config(cfg: RunConfig, run_dir: Path) -> None:
    """Save the resolved config as RUN/config.yaml, warning when it differs from the one already there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(_diff(old, new))
        if changed:
            print(f"note: {path} differs from this config in {', '.join(changed)}; stages already complete "
                  "keep their outputs (delete a stage folder to redo it)")
    atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))


def _diff(old, new, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for key in old.keys() | new.keys():
            out |= _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return set() if old == new else {prefix.rstrip(".")}


def run_stage(name: str, cfg: RunConfig, run_dir: Path) -> Path:
    stage = next(s for s in STAGES if s.name == name)
    record_config(cfg, run_dir)
    return stage.run(cfg, run_dir)


def run_all(cfg: RunConfig, run_dir: Path, stop_after: str | None = None) -> dict[str, Path]:
    """Run every enabled stage in order (skipping complete ones); returns each stage's output folder."""
    record_config(cfg, run_dir)
    outputs: dict[str, Path] = {}
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        started = time.time()
        print(f"=== {stage.name} ===", flush=True)
        outputs[stage.name] = stage.run(cfg, run_dir)
        print(f"=== {stage.name} done in {time.time() - started:.0f}s → {outputs[stage.name]}", flush=True)
        if stage.name == stop_after:
            break
    return outputs
