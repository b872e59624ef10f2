"""Uncertainty of the gap report: standard errors, intervals for the gap and for "% recovered".

Every metric of the suite is a ratio of sums over independent units — benchmark items, or held-out
documents — optionally exponentiated:

    value = g(Σ_i num_i / Σ_i den_i),   g = identity (accuracy, KL, agreement, acceptance) or exp (perplexity)

`Units` holds the per-unit `num` `[n]` and `den` `[n]` (den = 1 per item for an accuracy). Teacher and
student are scored on the same units in the same order, so the gap is estimated *paired*: one bootstrap
draw resamples unit indices once and recomputes both models' values from the same units.

- accuracies (`binomial=True`): standard error sqrt(p (1 − p) / n), the binomial one;
- everything else: the bootstrap standard error (std of `BOOTSTRAP_SAMPLES` resampled values);
- the gap and "% recovered": the 2.5 / 97.5 percentiles of their paired bootstrap draws; a gap whose
  interval contains 0 is within noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass
class Units:
    """Per-unit sums of one metric: `num` and `den` float64 `[n]`; `transform` "mean" or "exp"."""

    num: np.ndarray
    den: np.ndarray
    transform: str = "mean"
    binomial: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Units:
        num = np.asarray(data["num"], dtype=np.float64)
        den = np.asarray(data["den"], dtype=np.float64) if data.get("den") is not None else np.ones_like(num)
        return cls(num, den, data.get("transform", "mean"), bool(data.get("binomial", False)))

    def value(self) -> float:
        return _apply(self.transform, float(self.num.sum()) / float(self.den.sum()))

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """Values under bootstrap draws: `counts` `[B, n]` (how often each unit is drawn) → `[B]`."""
        with np.errstate(divide="ignore", invalid="ignore"):
            means = (counts @ self.num) / (counts @ self.den)
        return np.exp(means) if self.transform == "exp" else means


def _apply(transform: str, mean: float) -> float:
    if transform == "exp":
        return math.exp(mean)
    if transform != "mean":
        raise ValueError(f"units: unknown transform {transform!r} (mean, exp)")
    return mean


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion `p` measured on `n` independent items: sqrt(p (1 − p) / n)."""
    if n <= 0:
        raise ValueError(f"binomial_se: needs n > 0 items, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def bootstrap_counts(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """`[samples, n]` multinomial draw counts: row b says how often each of the n units is in resample b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def standard_error(units: Units) -> float:
    """Binomial standard error for an accuracy, else the bootstrap one (over units); NaN for one unit."""
    n = units.num.shape[0]
    if units.binomial:
        return binomial_se(units.value(), n)
    if n < 2:
        return float("nan")
    draws = units.resampled(bootstrap_counts(n))
    return float(np.std(draws[np.isfinite(draws)], ddof=1))


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The central `confidence` interval of bootstrap draws (non-finite draws dropped), or None."""
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(draws, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_gap(teacher: Units, student: Units, gap: Callable[[np.ndarray, np.ndarray], np.ndarray],
               recovered: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Paired bootstrap of a gap and of "% recovered" (both functions of teacher and student values,
    elementwise on arrays `[B]`). Units must be the same items in the same order for both models.

    Returns `gap_se`, `gap_ci` [lo, hi], `recovered_ci` [lo, hi] or None, `within_noise`.
    """
    n = teacher.num.shape[0]
    if student.num.shape[0] != n:
        raise ValueError(f"paired bootstrap: the teacher has {n} units, the student {student.num.shape[0]}; "
                         "both must be scored on the same items")
    counts = bootstrap_counts(n)
    t, s = teacher.resampled(counts), student.resampled(counts)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g, r = gap(t, s), recovered(t, s)
    g_ci = percentile_interval(g)
    finite = g[np.isfinite(g)]
    return {"gap_se": float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan"),
            "gap_ci": list(g_ci) if g_ci else None,
            "recovered_ci": list(ci) if (ci := percentile_interval(r)) else None,
            "within_noise": g_ci is None or g_ci[0] <= 0.0 <= g_ci[1]}
