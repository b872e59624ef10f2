"""The on_policy gap task through the real suite: reverse KL(student ‖ teacher) on the student's own samples
and arithmetic accuracy, on tiny real models with the SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from conftest import make_tiny_llama

from evaluation.suite import evaluate_models
from evaluation.tasks.on_policy import heldout_prompts


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


def test_heldout_prompts_are_fixed_one_digit_arithmetic():
    tasks = heldout_prompts(5)
    assert [t.id for t in tasks] == [t.id for t in heldout_prompts(5)]
    assert all(t.domain == "math" and t.reference["answer"].lstrip("-").isdigit() for t in tasks)


def test_on_policy_task_in_the_gap_suite(tiny_teacher_dir, smollm2_dir, tmp_path):
    other = make_tiny_llama(tmp_path / "other", smollm2_dir, seed=5)
    kwargs = dict(teacher="T", teacher_path=tiny_teacher_dir, tasks=["on_policy"], limit=3, batch_size=2)
    report = evaluate_models({"other": other}, out_dir=tmp_path / "out", **kwargs)
    assert not report["errors"]
    metrics = {name: m["metrics"] for name, m in report["models"].items()}
    assert metrics["T"]["kl_to_teacher_on_policy"] == 0.0
    # Two random tiny models are both near uniform: small, but clearly not 0.
    assert metrics["other"]["kl_to_teacher_on_policy"] > 1e-3
    assert all(0.0 <= m["arith_acc"] <= 1.0 for m in metrics.values())
    assert report["throughput"]["other"]["on_policy"]["samples"] == 3
    assert "| kl_to_teacher_on_policy | ↓ |" in (tmp_path / "out" / "report.md").read_text()
    again = evaluate_models({"other": other}, out_dir=tmp_path / "out2", **kwargs)
    assert all(t["cached"] for tasks in again["throughput"].values() for t in tasks.values())
    assert again["models"]["other"]["metrics"] == metrics["other"]
