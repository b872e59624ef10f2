"""The error-bar math against known cases: binomial standard errors, the bootstrap, paired gap intervals,
and the speculative-decoding formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.report import gap_row, tokens_per_forward
from evaluation.stats import Units, binomial_se, bootstrap_counts, paired_gap, standard_error


def test_binomial_standard_error_known_cases():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.35, 20) == pytest.approx(0.1067, abs=1e-4)  # ARC-Easy 7/20: ±0.11
    assert binomial_se(0.5, 278) <= 0.03 < binomial_se(0.5, 277)  # items for SE ≤ 0.03 at the worst p
    assert binomial_se(0.0, 50) == 0.0 and binomial_se(1.0, 50) == 0.0
    with pytest.raises(ValueError, match="n > 0"):
        binomial_se(0.5, 0)


def test_accuracy_units_use_the_binomial_formula_and_the_bootstrap_agrees():
    correct = np.array([1.0] * 70 + [0.0] * 130)
    units = Units(correct, np.ones_like(correct), binomial=True)
    assert units.value() == pytest.approx(0.35)
    assert standard_error(units) == pytest.approx(math.sqrt(0.35 * 0.65 / 200))
    boot = standard_error(Units(correct, np.ones_like(correct)))  # same data, bootstrap instead
    assert boot == pytest.approx(math.sqrt(0.35 * 0.65 / 200), rel=0.1)


def test_bootstrap_of_a_ratio_of_sums():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, size=400).astype(float)
    nll = tokens * rng.normal(2.0, 0.5, size=400)
    units = Units(nll, tokens, transform="exp")
    assert units.value() == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    # Delta method for a ratio estimator: var ≈ Σ (num_i − r den_i)² / (Σ den_i)², then × exp(r)² for exp.
    r = nll.sum() / tokens.sum()
    delta = math.sqrt(((nll - r * tokens) ** 2).sum()) / tokens.sum() * math.exp(r)
    assert standard_error(units) == pytest.approx(delta, rel=0.15)
    counts = bootstrap_counts(400)
    assert counts.shape == (1000, 400) and (counts.sum(1) == 400).all()


def test_paired_gap_is_zero_for_identical_models_and_clear_for_distant_ones():
    rng = np.random.default_rng(2)
    t = Units(rng.binomial(1, 0.6, 300).astype(float), np.ones(300), binomial=True)
    same = paired_gap(t, t, lambda a, b: a - b, lambda a, b: 100 * b / a)
    assert same["gap_ci"] == [0.0, 0.0] and same["within_noise"]
    assert same["recovered_ci"] == pytest.approx([100.0, 100.0])
    worse = Units(t.num * (rng.random(300) < 0.5), np.ones(300), binomial=True)  # half of the right answers
    far = paired_gap(t, worse, lambda a, b: a - b, lambda a, b: 100 * b / a)
    assert not far["within_noise"] and far["gap_ci"][0] > 0
    lo, hi = far["recovered_ci"]
    assert lo < 100 * worse.value() / t.value() < hi
    with pytest.raises(ValueError, match="same items"):
        paired_gap(t, Units(np.ones(3), np.ones(3)), lambda a, b: a - b, lambda a, b: b / a)


def test_small_samples_are_within_noise():
    # ARC-Easy in the old quickstart: teacher 10/20, student 7/20 on the same items (5 only the teacher
    # gets right, 2 only the student).
    teacher = {"num": [1.0] * 10 + [0.0] * 10, "den": None, "transform": "mean", "binomial": True}
    student = {"num": [1.0] * 5 + [0.0] * 5 + [1.0] * 2 + [0.0] * 8, "den": None, "transform": "mean", "binomial": True}
    row = gap_row("arc_easy_acc", 0.5, 0.35, True, teacher, student)
    assert row["student_se"] == pytest.approx(binomial_se(0.35, 20))
    assert row["teacher_se"] == pytest.approx(binomial_se(0.5, 20))
    assert row["within_noise"] and row["gap_ci"][0] < 0 < row["gap_ci"][1]
    assert row["recovered_ci"][0] < 70.0 < row["recovered_ci"][1]
    assert row["recovered_ci"][1] - row["recovered_ci"][0] > 20  # "70 % recovered" is not a precise claim


def test_tokens_per_forward_is_leviathans_formula():
    assert tokens_per_forward(0.0, 4) == 1.0  # every draft rejected: the teacher's own token only
    assert tokens_per_forward(1.0, 4) == 5.0  # every draft accepted, plus the teacher's bonus token
    assert tokens_per_forward(0.5, 2) == pytest.approx(1.75)
    for alpha in (0.1, 0.37, 0.9):
        for gamma in (1, 3, 8):
            assert tokens_per_forward(alpha, gamma) == pytest.approx(sum(alpha ** i for i in range(gamma + 1)))
            assert tokens_per_forward(alpha, gamma) < tokens_per_forward(alpha, gamma + 1)
            assert tokens_per_forward(alpha, gamma) < tokens_per_forward(min(1.0, alpha + 0.05), gamma)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tokens_per_forward(1.5, 2)
