"""The report's numbers recomputed independently (float64, full vocabulary, document by document) on real
tiny models and real held-out files — in- and out-of-distribution — and the teacher cache's reuse and
invalidation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from eval_helpers import per_document_reference, write_heldout

from evaluation.intrinsic import load_heldout
from evaluation.ood import DOMAINS, ood_heldout
from evaluation.report import tokens_per_forward
from evaluation.stats import binomial_se
from evaluation.suite import evaluate_models


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


def _float64(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


@torch.inference_mode()
def _check_intrinsic(metrics, student, teacher, heldout, suffix):
    nll, count, kl, agree, accept = per_document_reference(student, teacher, heldout)
    t_nll = per_document_reference(teacher, teacher, heldout)[0]
    total = sum(count.values())
    for dom in count:
        assert metrics["s"][f"ppl_{dom}{suffix}"] == pytest.approx(math.exp(nll[dom] / count[dom]), rel=1e-4)
        assert metrics["T"][f"ppl_{dom}{suffix}"] == pytest.approx(math.exp(t_nll[dom] / count[dom]), rel=1e-4)
        assert metrics["s"][f"accept_{dom}{suffix}"] == pytest.approx(accept[dom] / count[dom], rel=1e-4)
    assert metrics["s"][f"kl_to_teacher{suffix}"] == pytest.approx(kl / total, rel=1e-3)
    assert metrics["s"][f"top1_agreement{suffix}"] == pytest.approx(agree / total, abs=2 / total)


def test_report_numbers_match_a_float64_reference(tiny_teacher_dir, smollm2_dir, tmp_path):
    heldout_file = write_heldout(tmp_path / "data", rows=4)
    student_dir = make_tiny_llama(tmp_path / "student", smollm2_dir, seed=21)
    report = evaluate_models({"s": student_dir}, teacher="T", teacher_path=tiny_teacher_dir,
                             tasks=["intrinsic", "intrinsic_ood", "arc_easy"], limit=6, out_dir=tmp_path / "out",
                             heldout=heldout_file, batch_size=3, ood_documents=3, ood_doc_tokens=24)
    metrics = {name: m["metrics"] for name, m in report["models"].items()}
    student, teacher = _float64(student_dir), _float64(tiny_teacher_dir)
    _check_intrinsic(metrics, student, teacher, load_heldout(heldout_file), "")
    ood = load_heldout(ood_heldout(tiny_teacher_dir, documents=3, doc_tokens=24))
    assert ood.domains == list(DOMAINS) and ood.input_ids.shape == (9, 24)
    _check_intrinsic(metrics, student, teacher, ood, "_ood")

    rows = {r["metric"]: r for r in report["gap"]["s"]}
    assert list(rows)[0].endswith("_ood")  # the headline kind comes first
    ppl = rows["ppl_math_ood"]
    assert ppl["recovered_pct"] == pytest.approx(100 * metrics["T"]["ppl_math_ood"] / metrics["s"]["ppl_math_ood"])
    assert ppl["recovered_ci"][0] <= ppl["recovered_pct"] <= ppl["recovered_ci"][1]
    assert ppl["student_se"] > 0 and ppl["gap_se"] > 0
    details = json.loads((tmp_path / "out" / "details" / "s__arc_easy.json").read_text())
    p = sum(d["pred"] == d["gold"] for d in details) / len(details)
    assert rows["arc_easy_acc"]["student"] == p
    assert rows["arc_easy_acc"]["student_se"] == pytest.approx(binomial_se(p, 6))
    assert rows["kl_to_teacher_ood"]["teacher"] == 0.0 and rows["accept_code_ood"]["teacher"] == 1.0

    spec = {(r["domain"], r["kind"]): r for r in report["speculative"]["s"]}
    assert set(spec) == {(d, k) for d in DOMAINS for k in ("ood",)} | {("general", "id"), ("math", "id")}
    alpha = metrics["s"]["accept_code_ood"]
    assert spec[("code", "ood")]["tokens_per_forward"]["4"] == pytest.approx(tokens_per_forward(alpha, 4))
    text = (tmp_path / "out" / "report.md").read_text()
    for needle in ("## Headline", "out-of-distribution", "Qasper", "minerva_math_500", "± ", "Speculative decoding"):
        assert needle in text


def _teacher_passes(monkeypatch, teacher_dir) -> list[int]:
    """Count the trunk passes of the model loaded from `teacher_dir` (evaluation.intrinsic._hidden)."""
    import evaluation.intrinsic as intrinsic

    calls: list[int] = []
    real = intrinsic._hidden

    def counting(model, ids, pos):
        if str(model.config._name_or_path) == str(teacher_dir):
            calls.append(ids.shape[0])
        return real(model, ids, pos)

    monkeypatch.setattr(intrinsic, "_hidden", counting)
    return calls


def test_teacher_scores_are_computed_once_per_teacher_and_data(tiny_teacher_dir, smollm2_dir, tmp_path, monkeypatch):
    heldout_file = write_heldout(tmp_path / "data", rows=4)
    kwargs = dict(teacher="T", tasks=["intrinsic"], limit=2, batch_size=2, checkpoint_tasks=["intrinsic"])
    students = [make_tiny_llama(tmp_path / f"s{i}", smollm2_dir, seed=30 + i) for i in range(3)]
    calls = _teacher_passes(monkeypatch, tiny_teacher_dir)
    evaluate_models({"a": students[0]}, teacher_path=tiny_teacher_dir, out_dir=tmp_path / "o1", heldout=heldout_file,
                    checkpoints={"ckpt": (students[1], 5)}, **kwargs)
    assert sum(calls) == 4  # one pass over the 4 rows, reused by the student and the checkpoint
    evaluate_models({"b": students[2]}, teacher_path=tiny_teacher_dir, out_dir=tmp_path / "o2", heldout=heldout_file,
                    **kwargs)
    assert sum(calls) == 4  # another student, later: the teacher's states come from the cache

    other_data = write_heldout(tmp_path / "data2", rows=4, seed=9)
    evaluate_models({"b": students[2]}, teacher_path=tiny_teacher_dir, out_dir=tmp_path / "o3", heldout=other_data,
                    **kwargs)
    assert sum(calls) == 8  # other data: the teacher runs again
    other_teacher = make_tiny_llama(tmp_path / "teacher2", smollm2_dir, seed=40)
    report = evaluate_models({"b": students[2]}, teacher_path=other_teacher, out_dir=tmp_path / "o4",
                             heldout=heldout_file, **kwargs)
    assert not report["throughput"]["b"]["intrinsic"]["cached"]  # another teacher: the student's KL is redone
    hidden = sorted(p.name for p in (tmp_path / "cache" / "eval" / "teacher_hidden").iterdir())
    assert len(hidden) == 3 and len({name.split("-")[0] for name in hidden}) == 2
