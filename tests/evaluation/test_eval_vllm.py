"""Generation through vLLM in the gap suite (vllm-cpu here): `eval.generation_backend`, the same greedy
texts as transformers on the real embedded teacher (with and without stop strings), and the eval stage run
both ways on a tiny teacher and a tiny student without tokenizer files (the plumbing: one engine per model,
cache entries per engine; random tiny models mostly repeat a token, so the texts there say little).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_llama

from core.artifacts import read_manifest, write_manifest
from core.config import ConfigError, TeacherConfig, load_config
from evaluation.lm import EvalModel
from evaluation.suite import evaluate_run
from evaluation.tasks import EvalContext, get_task

GENERATIVE = ("gsm8k", "humaneval", "mbpp")


def test_generation_backend_follows_the_teacher_backend_on_auto():
    for teacher_backend, eval_backend, engine in [
        ("vllm", "auto", "vllm"), ("transformers", "auto", "transformers"), ("vllm-server", "auto", "transformers"),
        ("transformers", "vllm", "vllm"), ("vllm", "transformers", "transformers"),
    ]:
        cfg = load_config(None, [f"teacher.backend={teacher_backend}", f"eval.generation_backend={eval_backend}"])
        assert cfg.eval.generation_engine(cfg.teacher) == engine
    with pytest.raises(ConfigError, match="eval.generation_backend"):
        load_config(None, ["eval.generation_backend=sglang"])
    with pytest.raises(ConfigError, match="eval.max_new_tokens: must be > 0"):
        load_config(None, ["eval.max_new_tokens=0"])
    with pytest.raises(ConfigError, match="eval.limit: must be >= 0"):
        load_config(None, ["eval.limit=-1"])
    full = load_config(Path(__file__).parents[2] / "configs" / "eval_full.yaml")
    assert full.eval.generation_engine(full.teacher) == "vllm" and full.eval.limit == 0
    assert set(GENERATIVE) <= set(full.eval.tasks) and "intrinsic_ood" in full.eval.tasks


def test_cache_key_names_the_engine_of_generative_tasks_only():
    hf, vllm = EvalContext(), EvalContext(generation_engine="vllm-float32")
    assert "engine" not in get_task("gsm8k").cache_key(hf)  # unchanged: older transformers entries stay valid
    assert get_task("gsm8k").cache_key(vllm)["engine"] == "vllm-float32"
    assert get_task("arc_easy").cache_key(vllm) == get_task("arc_easy").cache_key(hf)


def _details(out, model: str, task: str) -> list[dict]:
    return json.loads((out / "details" / f"{model}__{task}.json").read_text())


@pytest.fixture
def fast_vllm_start(monkeypatch):
    """vLLM's own CPU-CI switch: dynamo + eager instead of inductor kernels, ~25 s less per engine start on
    this CPU. The inductor path is what tests/teachers/test_vllm_teacher_backend.py runs."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_generations_equal_transformers_greedy_on_the_real_teacher(smollm2_dir, fast_vllm_start):
    from evaluation.tasks import gsm8k, humaneval
    from evaluation.vllm_lm import VLLMEvalModel

    questions = ["Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
                 "Question: A shop sells pens at 2 dollars each. How much do 4 pens cost?\nAnswer:"]
    functions = [it["prompt"] for it in humaneval.humaneval_items(2)]
    hf = EvalModel(smollm2_dir)
    engine = VLLMEvalModel(smollm2_dir, engine=TeacherConfig(backend="vllm"))
    try:
        # Without stop strings each text is all 48 greedy tokens or up to EOS: a token-for-token comparison.
        free = engine.generate(questions + functions, max_new_tokens=48)
        assert free == hf.generate(questions + functions, max_new_tokens=48)
        cut = {}
        for prompts, stop in ((questions, gsm8k.STOP), (functions, humaneval.STOP)):
            cut.update(zip(prompts, engine.generate(prompts, max_new_tokens=48, stop=stop), strict=True))
            assert [cut[p] for p in prompts] == hf.generate(prompts, max_new_tokens=48, stop=stop), stop
    finally:
        engine.close()
    assert engine.max_length == hf.max_length == 8192
    stopped = [p for p, text in zip(questions + functions, free, strict=True) if cut[p] != text]
    assert len(stopped) >= 2  # the stop strings did end generations (here "\n\n" and "\n#", "\ndef")


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_stage_generates_the_same_answers_with_vllm_and_transformers(tiny_teacher_dir, smollm2_dir, tmp_path,
                                                                           monkeypatch, fast_vllm_start):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    student = make_tiny_llama(run / "train" / "final", smollm2_dir, seed=9)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (student / name).unlink(missing_ok=True)  # like a checkpoint: vLLM gets a view with the teacher's
    write_manifest(run / "train", "train", config={}, teacher=None)
    common = [f"teacher.model={tiny_teacher_dir}", f"eval.tasks=[{','.join(GENERATIVE)},arc_easy]",
              "eval.limit=2", "eval.max_new_tokens=24"]

    out = evaluate_run(load_config(None, common + ["teacher.backend=vllm"]), run)  # auto → vllm
    with_vllm = json.loads((out / "report.json").read_text())
    assert read_manifest(out, "eval")["generation_engine"] == "vllm-float32"
    outputs = {(m, t): _details(out, m, t) for m in with_vllm["models"] for t in GENERATIVE}

    out = evaluate_run(load_config(None, common), run)  # same eval section, other engine: redone
    with_hf = json.loads((out / "report.json").read_text())
    assert not with_vllm["errors"] and not with_hf["errors"]
    assert (with_vllm["settings"]["generation_engine"], with_hf["settings"]["generation_engine"]) == \
        ("vllm-float32", "transformers")
    assert set(with_vllm["models"]) == {with_vllm["teacher"], "student"}
    for model in with_vllm["models"]:
        for task in GENERATIVE:
            assert with_vllm["throughput"][model][task]["engine"] == "vllm-float32"
            assert not with_hf["throughput"][model][task]["cached"]  # not served the vLLM entry
            assert _details(out, model, task) == outputs[(model, task)], (model, task)
        assert with_vllm["throughput"][model]["arc_easy"]["engine"] == "transformers"
        assert with_hf["throughput"][model]["arc_easy"]["cached"]  # scoring does not depend on the engine
        assert with_hf["models"][model]["metrics"] == with_vllm["models"][model]["metrics"]
