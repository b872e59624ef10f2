"""Pruning the real SmolLM2-135M-Instruct teacher (slow: loads the 135M model several times)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import load_config
from students.configs import STUDENT_SIZES, StudentSize
from students.init import init_student
from students.verify import VERIFY_TEXTS


def _kl_to_teacher(teacher, student, tok) -> float:
    """Mean KL(teacher ‖ student) per token, in nats, over the verification texts."""
    total, count = 0.0, 0
    for text in VERIFY_TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits[0].double(), -1)
            s = torch.log_softmax(student(ids).logits[0].double(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += ids.shape[1]
    return total / count


@pytest.mark.slow
def test_importance_layer_selection_beats_even_spacing_on_smollm2(smollm2_dir, tmp_path, monkeypatch):
    """Before any training, dropping the 6 layers of lowest block influence keeps the student much closer to
    the teacher than dropping 6 evenly spaced ones (measured: KL 1.24 vs 3.37 nats/token)."""
    monkeypatch.setitem(STUDENT_SIZES, "test-24l", StudentSize("test", layers=24))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    kl = {}
    for selection in ("even", "importance"):
        cfg = load_config(None, [f"teacher.model={smollm2_dir}", "student.size=test-24l",
                                 f"student.layer_selection={selection}"])
        out = init_student(cfg, tmp_path / selection)
        kl[selection] = _kl_to_teacher(teacher, AutoModelForCausalLM.from_pretrained(out).eval(), tok)
    assert kl["importance"] < 0.6 * kl["even"], kl
