"""`distill run` end to end through the real CLI: every stage on a tiny teacher, then a rerun that skips all.

The slow variant runs the real embedded SmolLM2 teacher through the same pipeline on a small budget.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "logits", "student_init", "train", "anneal", "eval", "publish"]


def distill(*args, timeout=1200):
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_run(run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in STAGES:
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["complete"] is True, stage
    report = json.loads((run / "eval" / "report.json").read_text())
    student_metrics = [m["metrics"] for m in report["models"].values() if m["role"] == "student"][0]
    assert {"kl_to_teacher", "top1_agreement", "ppl_general"} <= set(student_metrics)
    model = AutoModelForCausalLM.from_pretrained(run / "publish")
    tok = AutoTokenizer.from_pretrained(run / "publish")
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert "distillation" in (run / "publish" / "README.md").read_text()


def test_distill_run_tiny_end_to_end(tmp_path, tiny_teacher_dir):
    run = tmp_path / "run"
    out = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_teacher_dir}", "--output-dir", str(run))
    check_run(run)
    assert "kl_to_teacher" in out  # the gap table is printed
    started = time.time()
    rerun = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_teacher_dir}", "--output-dir", str(run))
    assert "=== publish done" in rerun
    assert time.time() - started < 120


@pytest.mark.slow
def test_distill_run_quickstart_small_budget(tmp_path):
    run = tmp_path / "qs"
    distill("run", "configs/quickstart.yaml", "data.train_tokens=8192", "data.heldout_sequences_per_domain=2",
            "student.size=smollm2-prune-4l", "eval.limit=3", "eval.max_new_tokens=64", "eval.ood_documents=4",
            "eval.task_limits={}", "--output-dir", str(run))
    check_run(run)
