"""Hand-computable checks of every metric: intrinsic (ppl, KL, agreement), GSM8K, pass@1, multiple choice,
and the gap rules."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import make_tiny_llama
from eval_helpers import per_document_reference, write_heldout

from evaluation.intrinsic import (
    intrinsic_metrics,
    intrinsic_sums,
    load_heldout,
    metrics_from_sums,
    unit_index,
    units_from_sums,
)
from evaluation.lm import ContinuationScore, EvalModel
from evaluation.report import gap_row, gap_table_markdown
from evaluation.stats import Units
from evaluation.tasks import EvalContext, get_task
from evaluation.tasks.gsm8k import gsm8k_items
from evaluation.tasks.humaneval import humaneval_items
from evaluation.tasks.mbpp import mbpp_items


@pytest.fixture
def heldout_file(tmp_path):
    return write_heldout(tmp_path / "data")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------
# Intrinsic
# ---------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_intrinsic_matchesper_document_reference(tiny_teacher_dir, smollm2_dir, heldout_file, tmp_path):
    teacher = EvalModel(tiny_teacher_dir).model
    student = EvalModel(make_tiny_llama(tmp_path / "student", smollm2_dir, seed=7)).model
    heldout = load_heldout(heldout_file)
    metrics, tokens = intrinsic_metrics(student, teacher, heldout, batch_size=2, chunk_size=7)
    nll, count, kl, agree, accept = per_document_reference(student, teacher, heldout)
    total = sum(count.values())
    # 2 rows × (23 next-token targets minus the second document's first token) − 2 masked targets in row 0
    assert tokens == total == 2 * 22 - 2
    for dom in ("general", "math"):
        assert metrics[f"ppl_{dom}"] == pytest.approx(math.exp(nll[dom] / count[dom]), rel=1e-4)
        assert metrics[f"accept_{dom}"] == pytest.approx(accept[dom] / count[dom], rel=1e-4)
        assert 0 < metrics[f"accept_{dom}"] < 1
    assert metrics["ppl_all"] == pytest.approx(math.exp(sum(nll.values()) / total), rel=1e-4)
    assert metrics["kl_to_teacher"] == pytest.approx(kl / total, rel=1e-3, abs=1e-6)
    assert metrics["kl_to_teacher"] > 0
    assert metrics["top1_agreement"] == pytest.approx(agree / total)


@torch.inference_mode()
def test_per_document_sums_add_up_to_the_metrics(tiny_teacher_dir, smollm2_dir, heldout_file, tmp_path):
    teacher = EvalModel(tiny_teacher_dir).model
    student = EvalModel(make_tiny_llama(tmp_path / "student", smollm2_dir, seed=8)).model
    heldout = load_heldout(heldout_file)
    assert unit_index(heldout.position_ids).tolist() == [[0] * 8 + [1] * 16, [2] * 8 + [3] * 16]
    sums = intrinsic_sums(student, teacher, heldout, batch_size=1, chunk_size=5)
    assert sums.domain.tolist() == [0, 0, 1, 1] and sums.tokens.tolist() == [5.0, 15.0, 7.0, 15.0]
    metrics = metrics_from_sums(sums, heldout.domains)
    units = {m: Units.from_json(u) for m, u in units_from_sums(sums, heldout.domains).items()}
    assert set(units) == set(metrics)
    for metric, value in metrics.items():
        assert units[metric].value() == pytest.approx(value, rel=1e-12)
    assert intrinsic_metrics(student, teacher, heldout, batch_size=2)[0] == pytest.approx(metrics, rel=1e-5)


def test_identical_student_has_zero_kl_and_full_agreement(tiny_teacher_dir, heldout_file, tmp_path):
    copy = shutil.copytree(tiny_teacher_dir, tmp_path / "copy")
    teacher, student = EvalModel(tiny_teacher_dir).model, EvalModel(copy).model
    assert student is not teacher
    heldout = load_heldout(heldout_file)
    metrics, _ = intrinsic_metrics(student, teacher, heldout, batch_size=2)
    self_metrics, _ = intrinsic_metrics(teacher, teacher, heldout, batch_size=3)
    assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["top1_agreement"] == 1.0
    assert self_metrics["kl_to_teacher"] == 0.0 and self_metrics["top1_agreement"] == 1.0
    assert self_metrics["accept_general"] == 1.0 and metrics["accept_math"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ppl_all"] == pytest.approx(self_metrics["ppl_all"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Tasks with an oracle "model" that answers from the reference
# ---------------------------------------------------------------------------------------------------------


class AnswerBook:
    """A model that answers every prompt from a table (a test oracle for the scoring rules)."""

    def __init__(self, answers: dict[str, str], gold: dict[str, str] | None = None) -> None:
        self.answers, self.gold = answers, gold or {}
        self.calls: list[dict] = []

    def generate(self, prompts, *, max_new_tokens, stop=(), batch_size=8):
        self.calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens, "stop": tuple(stop)})
        return [self.answers[p] for p in prompts]

    def score(self, requests, batch_size=8):
        # log-prob 0 for the right continuation of a context, −10 for any other
        return [ContinuationScore(0.0 if self.gold.get(c) == cont else -10.0, 1, False) for c, cont in requests]


def test_gsm8k_accuracy_of_right_and_wrong_answers():
    items = gsm8k_items(5)
    right = AnswerBook({it["prompt"]: it["reference"] for it in items})
    ctx = EvalContext(limit=5, max_new_tokens=64)
    result = get_task("gsm8k").run(right, ctx)
    assert result.metrics == {"gsm8k_acc": 1.0}
    assert right.calls[0]["max_new_tokens"] == 64 and "\n\n" in right.calls[0]["stop"]
    wrong = AnswerBook({it["prompt"]: f"So the answer is {int(it['answer'].replace(',', '')) + 1}." for it in items})
    assert get_task("gsm8k").run(wrong, ctx).metrics == {"gsm8k_acc": 0.0}


def test_humaneval_pass_at_1_of_canonical_and_empty_solutions():
    problems = humaneval_items(3)
    ctx = EvalContext(limit=3)
    canonical = AnswerBook({p["prompt"]: p["canonical_solution"] for p in problems})
    assert get_task("humaneval").run(canonical, ctx).metrics == {"humaneval_pass@1": 1.0}
    empty = AnswerBook({p["prompt"]: "    pass\n" for p in problems})
    assert get_task("humaneval").run(empty, ctx).metrics == {"humaneval_pass@1": 0.0}


def test_mbpp_pass_at_1_of_reference_solutions():
    items = mbpp_items(3)
    reference = AnswerBook({it["prompt"]: it["reference"] for it in items})
    assert get_task("mbpp").run(reference, EvalContext(limit=3)).metrics == {"mbpp_pass@1": 1.0}


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "hellaswag", "piqa", "mmlu"])
def test_multiple_choice_accuracy_of_an_oracle(name):
    task = get_task(name)
    items = task.items(4)
    oracle = AnswerBook({}, gold={it.context: it.choices[it.gold] for it in items})
    assert task.run(oracle, EvalContext(limit=4)).metrics == {f"{name}_acc": 1.0, f"{name}_acc_norm": 1.0}
    contrarian = AnswerBook({}, gold={it.context: it.choices[(it.gold + 1) % len(it.choices)] for it in items})
    assert task.run(contrarian, EvalContext(limit=4)).metrics == {f"{name}_acc": 0.0, f"{name}_acc_norm": 0.0}


@pytest.mark.parametrize("name", ["rg_simple_equations", "rg_time_intervals", "rg_complex_addition"])
def test_reasoning_gym_accuracy_of_right_and_wrong_answers(name):
    task = get_task(name)
    items = task.items(6)
    prefix = task.prompt_prefix()
    assert prefix.count("Question: ") == 3 and not any(it["question"] in prefix for it in items)
    right = AnswerBook({f"{prefix}Question: {it['question']}\nAnswer:": f" {it['answer']}" for it in items})
    result = task.run(right, EvalContext(limit=6, max_new_tokens=64))
    assert result.metrics == {f"{name}_acc": 1.0} and result.units[f"{name}_acc"]["binomial"]
    assert right.calls[0]["max_new_tokens"] == task.answer_tokens and "\n" in right.calls[0]["stop"]
    wrong = AnswerBook({f"{prefix}Question: {it['question']}\nAnswer:": " 123456789" for it in items})
    assert task.run(wrong, EvalContext(limit=6)).metrics == {f"{name}_acc": 0.0}


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'nope'.*gsm8k"):
        get_task("nope")


# ---------------------------------------------------------------------------------------------------------
# Gap rules
# ---------------------------------------------------------------------------------------------------------


def test_gap_rules():
    acc = gap_row("gsm8k_acc", 0.4, 0.1, higher_is_better=True)
    assert acc["abs_gap"] == pytest.approx(0.3) and acc["recovered_pct"] == pytest.approx(25.0)
    ppl = gap_row("ppl_math", 10.0, 20.0, higher_is_better=False)
    assert ppl["abs_gap"] == pytest.approx(10.0) and ppl["recovered_pct"] == pytest.approx(50.0)
    kl = gap_row("kl_to_teacher", 0.0, math.log(2), higher_is_better=False)
    assert kl["abs_gap"] == pytest.approx(math.log(2)) and kl["recovered_pct"] == pytest.approx(50.0)
    assert gap_row("humaneval_pass@1", 0.0, 0.0, higher_is_better=True)["recovered_pct"] is None
    report = {"teacher": "T", "models": {"T": {"role": "teacher"}, "S": {"role": "student"}},
              "gap": {"S": [acc, ppl, kl]}}
    table = gap_table_markdown(report, "S")
    assert "| gsm8k_acc | ↑ | 0.4000 | 0.1000 | 0.3000 | 25.0% |" in table
    assert "| ppl_math | ↓ | 10.000 | 20.000 | 10.000 | 50.0% |" in table
