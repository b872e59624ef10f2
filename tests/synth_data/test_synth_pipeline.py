"""The synth stage end to end on the tiny random teacher: dataset, reward model, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.artifacts import read_manifest
from core.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, smollm2_dir) -> Path:
    """A random tiny LlamaForSequenceClassification (one label) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_rm")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, num_labels=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(teacher: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"teacher.model={teacher}", "synth.enabled=true", "synth.prompts=[seed:math, seed:code, seed:general]",
        "synth.max_prompts=2", "synth.samples_per_prompt=2", "synth.max_new_tokens=8", "synth.drop_truncated=false",
        "synth.min_response_tokens=1", *extra,
    ])


def test_reward_model_scores(tiny_reward_model):
    from synth_data.rejection import select
    from synth_data.scorers import RewardModel

    rm = RewardModel(str(tiny_reward_model))
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]
             for text in ("Hello there!", "Go away.", "Hello there!")]
    scores = rm.score(convs)
    assert scores[0] == scores[2] and scores[0] != scores[1]
    samples = [{"passed": True, "score": s} for s in scores]
    assert select(samples, "best") == [0 if scores[0] > scores[1] else 1]
    assert select(samples, "all_passing") == [0, 1, 2]


def test_synthesize_end_to_end(tiny_teacher_dir, tiny_reward_model, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from synth_data.pipeline import synthesize
    from synth_data.scorers import RewardModel
    from synth_data.sft import chat_to_training_ids

    cfg = _cfg(tiny_teacher_dir, f"synth.reward_model={tiny_reward_model}")
    out = synthesize(cfg, tmp_path)
    manifest = read_manifest(out, "synth")
    summary = json.loads((out / "summary.json").read_text())
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert summary["counts"]["prompts"] == 6 and summary["counts"]["samples"] == 12
    assert len(ds) == summary["counts"]["rows"] == manifest["rows"]
    assert len((out / "synth.jsonl").read_text().splitlines()) == len(ds)
    assert datasets.Dataset.from_parquet(str(out / "synth.parquet")).num_rows == len(ds)
    report = (out / "report.md").read_text()
    assert "| general | 2 | 4 |" in report and "exact_duplicate" in report
    verdicts = summary["verdicts"]
    assert sum(verdicts.values()) == 12 and verdicts["reward_model"] == 4
    assert set(verdicts) <= {"pass", "fail", "reward_model"}
    # Every general prompt keeps its reward model's favourite answer (none can fail a verifier).
    general = [r for r in ds if r["domain"] == "general"]
    assert len(general) == 2
    rm = RewardModel(str(tiny_reward_model))
    scored = {json.loads(line)["prompt_id"]: json.loads(line)["samples"]
              for line in (out / "work" / "scored.jsonl").read_text().splitlines()}
    for row in general:
        assert row["verdict"] == "reward_model"
        assert row["score"] == pytest.approx(rm.score([row["messages"]])[0], abs=1e-5)
        assert row["score"] == max(s["score"] for s in scored[row["prompt_id"]])
        assert row["teacher"] == str(tiny_teacher_dir) and row["sampling"]["n"] == 2
    # Verified domains only keep passing samples.
    assert all(r["verdict"] == "pass" for r in ds if r["domain"] in ("math", "code"))
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    ids, mask = chat_to_training_ids(general[0]["messages"], tok)
    assert 0 < sum(mask) < len(ids)
    # A completed stage is not redone.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    start = time.monotonic()
    assert synthesize(cfg, tmp_path) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and time.monotonic() - start < 5


@pytest.mark.slow  # ~20 s alone, over 60 s on a loaded 2-core machine
def test_resume_after_sigkill(tiny_teacher_dir, tmp_path):
    from synth_data.pipeline import synthesize

    overrides = [f"teacher.model={tiny_teacher_dir}", "synth.enabled=true",
                 "synth.prompts=[seed:math, seed:code, seed:general]", "synth.max_prompts=2",
                 "synth.samples_per_prompt=2", "synth.max_new_tokens=16", "synth.generation_batch=1",
                 "synth.drop_truncated=false", "synth.min_response_tokens=1"]
    child = (
        "import sys; from pathlib import Path; from core.config import load_config; "
        "from synth_data.pipeline import synthesize; "
        f"synthesize(load_config({str(REPO / 'configs' / 'tiny.yaml')!r}, {overrides!r}), Path({str(tmp_path)!r}))"
    )
    log_path = tmp_path / "synth" / "work" / "samples.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    lines_at_kill = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.is_file() and (lines_at_kill := log_path.read_bytes().count(b"\n")) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"child ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert 2 <= lines_at_kill < 6, "the kill must land in the middle of sampling"
    assert not (tmp_path / "synth" / "manifest.json").exists()

    from core.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="different synth"):
        synthesize(load_config(REPO / "configs" / "tiny.yaml", [*overrides, "synth.temperature=0.5"]), tmp_path)
    out = synthesize(load_config(REPO / "configs" / "tiny.yaml", overrides), tmp_path)
    ids = [json.loads(line)["prompt_id"] for line in log_path.read_text().splitlines()]
    prompts = [json.loads(line)["id"] for line in (out / "work" / "prompts.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(prompts) == 6
    assert set(ids) == set(prompts)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["samples"] == 12
    assert 0 < summary["generation"]["this_run"]["prompts"] < 6  # the rerun sampled only what was missing


def test_a_synth_stage_where_nothing_passes_leaves_a_readable_empty_dataset(tiny_teacher_dir, tmp_path):
    import datasets
    import pyarrow.parquet

    from core.config import InputError
    from distill.data import build_data
    from synth_data.pipeline import synthesize

    # No sample of at most 8 tokens has 9: every sample is dropped.
    cfg = _cfg(tiny_teacher_dir, "synth.prompts=[seed:math]", "synth.min_response_tokens=9")
    out = synthesize(cfg, tmp_path)
    assert len(datasets.load_from_disk(str(out / "dataset"))) == 0 == read_manifest(out, "synth")["rows"]
    assert pyarrow.parquet.read_table(out / "synth.parquet").num_rows == 0
    data_cfg = load_config(REPO / "configs" / "tiny.yaml", [f"teacher.model={tiny_teacher_dir}",
                                                            "data.sources=[{name: sft, kind: synth}]"])
    with pytest.raises(InputError, match="data source 'sft': not enough text"):
        build_data(data_cfg, tmp_path)
