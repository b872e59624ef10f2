"""Learning-rate schedules as plain functions `lr_at(step) -> lr` (absolute learning rate).

A schedule is a pure function of the optimizer step (0-based, `0 ≤ step < num_steps`), so resuming from a
checkpoint needs only the step number to continue the exact same curve.

- `cosine`: linear warmup to `peak_lr`, then a half cosine down to `min_lr_ratio · peak_lr` at the last step.
- `wsd` (warmup–stable–decay, Hu et al., 2024 "MiniCPM"): warmup, a flat phase at `peak_lr`, then a linear
  decay to `min_lr_ratio · peak_lr` over the last `decay_fraction` of the steps. Checkpoints from the stable
  phase can later be decayed (annealed) separately.
- `constant`: warmup, then `peak_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from core.config import InputError

ScheduleName = Literal["cosine", "wsd", "constant"]


def lr_schedule(kind: ScheduleName, *, peak_lr: float, num_steps: int, warmup_steps: int = 0,
                min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> Callable[[int], float]:
    """Return `lr_at(step)` for `num_steps` optimizer steps; errors name the offending `train.*` field."""
    if num_steps <= 0:
        raise InputError(f"lr schedule: num_steps must be > 0, got {num_steps!r}")
    if peak_lr <= 0:
        raise InputError(f"train.lr: must be > 0, got {peak_lr!r}")
    if warmup_steps < 0:
        raise InputError(f"train.warmup_steps: must be >= 0, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise InputError(f"train.min_lr_ratio: must be in [0, 1], got {min_lr_ratio!r}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise InputError(f"train.decay_fraction: must be in [0, 1], got {decay_fraction!r}")
    if kind not in ("cosine", "wsd", "constant"):
        raise InputError(f"train.schedule: unknown schedule {kind!r} (valid: cosine, wsd, constant)")
    # Never let warmup eat the whole run: at most all steps but one.
    warmup = min(warmup_steps, num_steps - 1)
    min_lr = min_lr_ratio * peak_lr
    decay_steps = max(1, round(decay_fraction * num_steps)) if decay_fraction > 0 else 0
    decay_start = max(warmup, num_steps - decay_steps)

    def lr_at(step: int) -> float:
        if not 0 <= step < num_steps:
            raise InputError(f"lr schedule: step {step} outside 0..{num_steps - 1}")
        if step < warmup:
            return peak_lr * (step + 1) / (warmup + 1)
        if kind == "constant":
            return peak_lr
        if kind == "cosine":
            span = num_steps - 1 - warmup
            progress = (step - warmup) / span if span > 0 else 1.0
            return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        # wsd
        if decay_steps == 0 or step < decay_start:
            return peak_lr
        span = num_steps - 1 - decay_start
        progress = (step - decay_start) / span if span > 0 else 1.0
        return peak_lr + (min_lr - peak_lr) * progress

    return lr_at


def schedule_from_config(train_cfg, num_steps: int) -> Callable[[int], float]:
    """`lr_at` for a `core.config.TrainConfig` over `num_steps` steps."""
    return lr_schedule(train_cfg.schedule, peak_lr=train_cfg.lr, num_steps=num_steps,
                       warmup_steps=train_cfg.warmup_steps, min_lr_ratio=train_cfg.min_lr_ratio,
                       decay_fraction=train_cfg.decay_fraction)
