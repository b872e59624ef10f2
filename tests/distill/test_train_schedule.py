"""Learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from distill.schedule import lr_schedule


def test_cosine_with_warmup():
    lr = lr_schedule("cosine", peak_lr=1.0, num_steps=11, warmup_steps=2, min_lr_ratio=0.1)
    values = [lr(s) for s in range(11)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))  # monotone decay
    mid = 2 + (10 - 2) // 2
    assert values[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_stable_decay():
    lr = lr_schedule("wsd", peak_lr=2.0, num_steps=10, warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.3)
    values = [lr(s) for s in range(10)]
    assert values[:2] == pytest.approx([2 / 3, 4 / 3])
    assert values[2:7] == pytest.approx([2.0] * 5)
    assert values[7:] == pytest.approx([2.0, 1.0, 0.0])


def test_constant_and_errors():
    lr = lr_schedule("constant", peak_lr=0.5, num_steps=4, warmup_steps=1)
    assert [lr(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="outside"):
        lr(4)
    with pytest.raises(ValueError, match="train.schedule"):
        lr_schedule("linear", peak_lr=1.0, num_steps=3)
    with pytest.raises(ValueError, match="train.lr"):
        lr_schedule("cosine", peak_lr=0.0, num_steps=3)
    # Warmup longer than the run still reaches the peak on the last step.
    short = lr_schedule("constant", peak_lr=1.0, num_steps=3, warmup_steps=10)
    assert short(2) == pytest.approx(1.0)
