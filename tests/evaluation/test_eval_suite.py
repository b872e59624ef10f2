"""The batched model primitives, the cache, the report files, `distill eval` on folders and the eval stage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama
from eval_helpers import write_heldout

from core.artifacts import TOKENIZER_FILES, is_complete, read_manifest, write_manifest
from core.config import load_config
from evaluation.cache import model_hash
from evaluation.lm import EvalModel, truncate_at_stop
from evaluation.suite import EvalIncomplete, eval_cli, evaluate_models, evaluate_run


@pytest.fixture
def heldout_file(tmp_path):
    return write_heldout(tmp_path / "data")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))



@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    return EvalModel(tiny_teacher_dir)


def test_batched_generation_equals_one_at_a_time(tiny):
    prompts = ["def add(a, b):", "Question: what is 2 + 2?\nAnswer: It is", "Hi"]
    batched = tiny.generate(prompts, max_new_tokens=6, batch_size=3)
    alone = [tiny.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(len(tiny.encode(o, special=False)) <= 6 for o in batched)


def test_prompts_sharing_a_few_shot_header_generate_as_if_alone(tiny):
    header = "Question: 1 + 1?\nAnswer: 2\n\nQuestion: 2 + 3?\nAnswer: 5\n\n"
    prompts = [header + f"Question: {a} + {b}?\nAnswer:" for a, b in ((1, 4), (3, 3), (7, 2))] + [header + "Q"]
    # the header is run once and its cache shared by every batch (a batch of 2, then one of 2)
    assert len(tiny._shared_prefix([tiny.encode(p) for p in prompts])[0]) >= len(tiny.encode(header)) - 1
    for stop in ((), ("\n",)):
        batched = tiny.generate(prompts, max_new_tokens=6, batch_size=2, stop=stop)
        assert batched == [tiny.generate([p], max_new_tokens=6, batch_size=1, stop=stop)[0] for p in prompts]


def test_stop_strings_cut_the_output(tiny):
    full = tiny.generate(["Hello"], max_new_tokens=8)[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = tiny.generate(["Hello"], max_new_tokens=8, stop=[stop])[0]
    assert cut == full[:full.find(stop)]
    assert truncate_at_stop("abc\n\nxyz Question: q", ["Question:", "\n\n"]) == "abc"


@torch.inference_mode()
def test_score_equals_manual_log_likelihood(tiny):
    # Choices of one context share a row (the context scored once); each must score as if alone.
    requests = [("The cat sat on the", " mat"), ("One two", " three four five"), ("The cat sat on the", " hat"),
                ("x", " y"), ("The cat sat on the", " warm red rug")]
    scores = tiny.score(requests, batch_size=2)
    for (ctx, cont), s in zip(requests, scores, strict=True):
        c, k = tiny.encode(ctx), tiny.encode(cont, special=False)
        ids = torch.tensor([c + k])
        lp = torch.log_softmax(tiny.model(ids).logits[0].double(), -1)
        expected = sum(float(lp[len(c) - 1 + j, k[j]]) for j in range(len(k)))
        assert s.num_tokens == len(k)
        assert s.logprob == pytest.approx(expected, abs=1e-3)
        assert s.is_greedy == all(int(lp[len(c) - 1 + j].argmax()) == k[j] for j in range(len(k)))


@torch.inference_mode()
def test_score_cuts_a_long_context_from_the_left(tiny, monkeypatch):
    context, cont = "one two three four five six seven eight nine ten", " eleven twelve"
    c, k = tiny.encode(context), tiny.encode(cont, special=False)
    monkeypatch.setattr(tiny, "max_length", len(k) + 3)  # room for 3 context tokens per continuation
    scores = tiny.score([(context, cont), (context, " zero")], batch_size=4)
    lp = torch.log_softmax(tiny.model(torch.tensor([c[-3:] + k])).logits[0].double(), -1)
    assert scores[0].logprob == pytest.approx(sum(float(lp[2 + j, k[j]]) for j in range(len(k))), abs=1e-3)


def test_model_hash_follows_the_weights(tiny_teacher_dir, smollm2_dir, tmp_path):
    copy = shutil.copytree(tiny_teacher_dir, tmp_path / "copy")
    assert model_hash(copy) == model_hash(tiny_teacher_dir)
    other = make_tiny_llama(tmp_path / "other", smollm2_dir, seed=3)
    assert model_hash(other) != model_hash(tiny_teacher_dir)


def test_model_hash_counts_the_tokenizer_it_is_evaluated_with(tiny_teacher_dir, tmp_path):
    """A checkpoint without tokenizer files, evaluated with the teacher's tokenizer, hashes like the final
    folder that holds the same weights and a copy of that tokenizer — and unlike one with another tokenizer."""
    weights_only = tmp_path / "checkpoint"
    weights_only.mkdir()
    for f in tiny_teacher_dir.iterdir():
        if f.name not in TOKENIZER_FILES:
            shutil.copy(f, weights_only / f.name)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        model_hash(weights_only)
    assert model_hash(weights_only, tiny_teacher_dir) == model_hash(tiny_teacher_dir)
    edited = shutil.copytree(tiny_teacher_dir, tmp_path / "edited")
    config = json.loads((edited / "tokenizer_config.json").read_text())
    (edited / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    assert model_hash(weights_only, edited) != model_hash(weights_only, tiny_teacher_dir)


def test_evaluate_models_writes_the_report_and_caches(tiny_teacher_dir, smollm2_dir, heldout_file, tmp_path):
    twin = shutil.copytree(tiny_teacher_dir, tmp_path / "twin")
    other = make_tiny_llama(tmp_path / "other", smollm2_dir, seed=5)
    kwargs = dict(teacher="T", teacher_path=tiny_teacher_dir, tasks=["intrinsic", "arc_easy"], limit=2,
                  heldout=heldout_file, batch_size=4)
    report = evaluate_models({"twin": twin, "other": other}, out_dir=tmp_path / "out", **kwargs)
    for f in ("report.json", "report.md", "gap.png"):
        assert (tmp_path / "out" / f).is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["teacher"] == "T"
    assert set(report["models"]) == {"T", "twin", "other"}
    assert report["models"]["T"]["role"] == "teacher" and report["models"]["twin"]["role"] == "student"
    twin_gap = {r["metric"]: r for r in report["gap"]["twin"]}
    assert twin_gap["kl_to_teacher"]["student"] == pytest.approx(0.0, abs=1e-6)
    assert twin_gap["top1_agreement"]["recovered_pct"] == pytest.approx(100.0)
    assert twin_gap["ppl_general"]["recovered_pct"] == pytest.approx(100.0, rel=1e-4)
    assert twin_gap["arc_easy_acc"]["student"] == report["models"]["T"]["metrics"]["arc_easy_acc"]
    assert {r["metric"] for r in report["gap"]["other"]} >= {"ppl_general", "ppl_math", "kl_to_teacher",
                                                            "top1_agreement", "arc_easy_acc"}
    assert report["throughput"]["other"]["arc_easy"]["samples"] == 2
    assert not report["errors"]
    assert "| kl_to_teacher | ↓ |" in (tmp_path / "out" / "report.md").read_text()

    assert len(list((tmp_path / "cache" / "eval" / "teacher_hidden").glob("*.safetensors"))) == 1

    again = evaluate_models({"twin": twin, "other": other}, out_dir=tmp_path / "out2", **kwargs)
    assert all(t["cached"] for tasks in again["throughput"].values() for t in tasks.values())
    assert again["gap"] == report["gap"]


def test_eval_cli_on_plain_folders(tiny_teacher_dir, smollm2_dir, tmp_path, capsys):
    student = make_tiny_llama(tmp_path / "my-student", smollm2_dir, seed=9)
    report = eval_cli([str(student)], str(tiny_teacher_dir), ["arc_easy"], 2, tmp_path / "out")
    assert "my-student" in report["gap"]
    assert "arc_easy_acc" in report["models"]["my-student"]["metrics"]
    assert "| arc_easy_acc |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        eval_cli([str(tmp_path)], str(tiny_teacher_dir), ["arc_easy"], 2, tmp_path / "out")


def test_eval_stage_with_checkpoints(tiny_teacher_dir, smollm2_dir, tmp_path):
    run = tmp_path / "run"
    heldout_dir = run / "data"
    write_heldout(heldout_dir)
    final = make_tiny_llama(run / "train" / "final", smollm2_dir, seed=11)
    # re-saved by the trainer, the final student's tokenizer config is not byte-identical to the teacher's
    config = json.loads((final / "tokenizer_config.json").read_text())
    (final / "tokenizer_config.json").write_text(json.dumps({**config, "errors": "replace"}))
    for step, seed in ((2, 12), (4, 11)):  # the last checkpoint holds the final student's weights
        ckpt = run / "train" / "checkpoints" / f"step-{step:06d}"
        make_tiny_llama(ckpt, smollm2_dir, seed=seed)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (ckpt / name).unlink(missing_ok=True)  # checkpoints hold weights only
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(run / "train", "train", config={}, teacher=None)
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "eval.tasks=[intrinsic]", "eval.limit=2",
                             "eval.checkpoint_tasks=[intrinsic]"])
    out = evaluate_run(cfg, run)
    assert read_manifest(out, "eval")["stage"] == "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["path"] == str(final)
    steps = {m["step"] for m in report["models"].values() if m["role"] == "checkpoint"}
    assert steps == {2, 4}
    # read with the final student's tokenizer, the last checkpoint is the final student: one evaluation
    assert report["throughput"]["train@4"]["intrinsic"]["cached"]
    assert report["models"]["train@4"]["metrics"] == report["models"]["student"]["metrics"]
    assert not report["throughput"]["train@2"]["intrinsic"]["cached"]
    assert (out / "gap_steps.png").is_file()
    assert "Gap over training steps" in (out / "report.md").read_text()

    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert evaluate_run(cfg, run) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # done: skipped
    more = load_config(None, [f"teacher.model={tiny_teacher_dir}", "eval.tasks=[intrinsic,arc_easy]", "eval.limit=2",
                              "eval.checkpoint_tasks=[intrinsic]"])
    report = json.loads((evaluate_run(more, run) / "report.json").read_text())  # other settings: redone
    assert "arc_easy_acc" in report["models"]["student"]["metrics"]
    assert report["throughput"]["student"]["intrinsic"]["cached"]


def _tiny_run(run, smollm2_dir, seed=11):
    """A run folder with held-out data, a finished train stage and its final student."""
    write_heldout(run / "data")
    make_tiny_llama(run / "train" / "final", smollm2_dir, seed=seed)
    write_manifest(run / "train", "train", config={"seed": seed}, teacher=None)
    return run


def test_failed_task_leaves_the_stage_incomplete_until_it_succeeds(tiny_teacher_dir, smollm2_dir, tmp_path,
                                                                   monkeypatch):
    from evaluation.tasks.multiple_choice import OlmoChoiceTask

    run = _tiny_run(tmp_path / "run", smollm2_dir)
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "eval.tasks=[intrinsic,arc_easy]", "eval.limit=2",
                             "eval.checkpoint_tasks=[]"])

    def unreadable(self, limit):
        raise OSError("benchmark file unreadable")

    with monkeypatch.context() as m:
        m.setattr(OlmoChoiceTask, "items", unreadable)
        failed = r"student / arc_easy: OSError: benchmark file unreadable.*distill eval"
        with pytest.raises(EvalIncomplete, match=failed):
            evaluate_run(cfg, run)
    assert not is_complete(run / "eval", "eval")
    report = json.loads((run / "eval" / "report.json").read_text())
    assert "arc_easy_acc" not in report["models"]["student"]["metrics"]  # never a score
    assert "arc_easy_acc" not in {r["metric"] for r in report["gap"]["student"]}
    assert report["errors"]["student"]["arc_easy"].startswith("OSError")
    assert "## Failed tasks" in (run / "eval" / "report.md").read_text()

    out = evaluate_run(cfg, run)  # the cause is gone: the advised rerun completes, intrinsic from the cache
    assert is_complete(out, "eval")
    report = json.loads((out / "report.json").read_text())
    assert not report["errors"] and "arc_easy_acc" in report["models"]["student"]["metrics"]
    assert report["throughput"]["student"]["intrinsic"]["cached"]


def test_new_inputs_invalidate_the_eval_stage(tiny_teacher_dir, smollm2_dir, tmp_path):
    run = _tiny_run(tmp_path / "run", smollm2_dir)
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "eval.tasks=[intrinsic]", "eval.checkpoint_tasks=[]"])
    first = json.loads((evaluate_run(cfg, run) / "report.json").read_text())
    stamp = (run / "eval" / "manifest.json").stat().st_mtime_ns
    evaluate_run(cfg, run)
    assert (run / "eval" / "manifest.json").stat().st_mtime_ns == stamp  # same inputs: skipped

    _tiny_run(run, smollm2_dir, seed=12)  # a retrained student (its stage manifest changes)
    second = json.loads((evaluate_run(cfg, run) / "report.json").read_text())
    assert second["models"]["student"]["metrics"] != first["models"]["student"]["metrics"]
    write_heldout(run / "data", seed=3)  # other held-out data
    third = json.loads((evaluate_run(cfg, run) / "report.json").read_text())
    assert third["models"]["student"]["metrics"] != second["models"]["student"]["metrics"]
    assert not third["throughput"][third["teacher"]]["intrinsic"]["cached"]


@torch.inference_mode()
def test_grouped_attention_matches_stock_sdpa(tiny, tiny_teacher_dir):
    from core.packing import document_causal_mask
    from teachers.resolve import load_model

    assert tiny.model.config._attn_implementation == "grouped_sdpa"
    stock = load_model(tiny_teacher_dir, device="cpu")
    assert stock.config._attn_implementation == "sdpa"
    ids, mask = tiny._left_pad([[5, 6, 7, 8, 9], [10, 11]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for kwargs in ({"attention_mask": mask, "position_ids": pos}, {}):  # padded batch; no mask (causal)
        torch.testing.assert_close(tiny.model(input_ids=ids, **kwargs).logits, stock(input_ids=ids, **kwargs).logits)
    packed = torch.tensor([[0, 1, 2, 0, 1]])
    torch.testing.assert_close(
        tiny.model(input_ids=ids[:1], attention_mask=document_causal_mask(packed), position_ids=packed).logits,
        stock(input_ids=ids[:1], attention_mask=document_causal_mask(packed), position_ids=packed).logits)
    gen = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 5, "do_sample": False,
           "pad_token_id": tiny.pad_id}
    assert torch.equal(tiny.model.generate(**gen), stock.generate(**gen))
