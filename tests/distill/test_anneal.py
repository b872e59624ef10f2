"""The annealing stage on a real tiny run: a 1-layer student trained on packed builtin text (general, math,
code), then annealed (LR linear to 0, math and code upsampled) and averaged, for both objectives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from safetensors.numpy import save_file
from safetensors.torch import load_file

from core.artifacts import read_manifest, write_manifest
from core.checkpoint import checkpoint_dir
from core.config import from_dict
from core.packed import write_packed_shard
from distill.anneal import (
    _install_final,
    anneal,
    anneal_steps,
    checkpoint_steps,
    choose_final,
    linear_to_zero,
)
from distill.corpora import builtin_corpus
from distill.data import Document, pack
from distill.trainer import read_metrics, train
from evaluation.anneal_report import report_markdown

SEQ_LEN = 32
DOMAINS = ["code", "general", "math"]


def test_plan_arithmetic():
    assert anneal_steps(80, 0.2) == 20  # 20 / (80 + 20) = 0.2 of the budget
    assert anneal_steps(12, 0.25) == 4
    assert anneal_steps(3, 0.01) == 1
    assert checkpoint_steps(20, 4) == [5, 10, 15, 20]
    assert checkpoint_steps(40, 4, window=0.5) == [25, 30, 35, 40]
    assert checkpoint_steps(10, 4, window=0.1) == [7, 8, 9, 10]  # never fewer steps than checkpoints
    assert checkpoint_steps(3, 5) == [1, 2, 3]
    lr = linear_to_zero(1e-3, 4)
    assert [lr(s) for s in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="start_lr"):
        linear_to_zero(0.0, 4)


def _write_data(run_dir: Path, tokenizer, identity: dict) -> None:
    """data/ with real builtin text: 8 train rows and 2 held-out rows per domain."""
    parts = {"train": [], "heldout": []}
    for j, domain in enumerate(DOMAINS):
        for split, rows in (("train", 8), ("heldout", 2)):
            docs = (Document(ids := tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                             [1] * len(ids)) for t in builtin_corpus(domain, split, max_chars=20_000))
            part = pack(docs, SEQ_LEN, rows)
            part["domain"] = np.full((rows,), j, dtype=np.int16)
            parts[split].append(part)
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True)
    split = {split: {k: np.concatenate([p[k] for p in ps]) for k in ps[0]} for split, ps in parts.items()}
    shard = write_packed_shard(data_dir / "train" / "000-000000.safetensors", split["train"])
    save_file(split["heldout"], str(data_dir / "heldout.safetensors"))
    write_manifest(data_dir, "data", config={}, teacher=identity, domains=DOMAINS, num_train=24, num_heldout=6,
                   seq_len=SEQ_LEN, train_shards=[shard])


def _make_run(run_dir: Path, teacher_dir: Path, objective: str, **anneal_overrides):
    from transformers import AutoTokenizer

    from teachers.resolve import teacher_identity

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    identity = teacher_identity(str(teacher_dir), None, tok, 49152)
    _write_data(run_dir, tok, identity)
    init_dir = make_tiny_llama(run_dir / "student_init", teacher_dir, layers=1, seed=1)
    write_manifest(init_dir, "student", config={}, teacher=identity)
    return from_dict({
        "teacher": {"model": str(teacher_dir)},
        "data": {"seq_len": SEQ_LEN, "sources": [{"name": "g", "domain": "general", "weight": 0.5},
                                                  {"name": "m", "domain": "math", "weight": 0.25},
                                                  {"name": "c", "domain": "code", "weight": 0.25}]},
        "capture": {"top_k": 8},
        "train": {"objective": objective, "teacher_source": "online", "batch_size": 2, "max_steps": 9,
                  "save_every": 3, "keep_last": 1, "log_every": 1, "lr": 2e-3, "warmup_steps": 1,
                  "loss_chunk_size": 32, "schedule": "wsd", "decay_fraction": 0.0},
        "anneal": {"enabled": True, "fraction": 0.25, "upsample": {"math": 3.0, "code": 3.0},
                   "num_checkpoints": 3, "average_window": 1.0, **anneal_overrides},
        "eval": {"batch_size": 4},
    })


def test_report_says_whether_averaging_helped():
    def report(averaged_math: float) -> str:
        per = {"last": {"math": 2.0, "code": 3.0}, "avg": {"math": averaged_math, "code": 3.0}}
        return report_markdown({
            "domains": ["code", "math"], "tokens": {"code": 100, "math": 300},
            "models": {name: {d: {"loss": loss, "kl": 1.0} for d, loss in per[key].items()}
                       for name, key in (("before", "last"), ("step 4", "last"), ("averaged", "avg"))}})

    helped, hurt = report(1.96), report(2.04)
    assert "code +0.0000, math -0.0400; all tokens -0.0300 nats/token" in helped
    assert "did worse" not in helped
    assert "math +0.0400; all tokens +0.0300" in hurt and "did worse than the last checkpoint" in hurt


def test_final_is_the_model_with_the_lower_heldout_loss():
    def report(averaged_math: float) -> dict:
        per = {"last": {"math": 2.0, "code": 3.0}, "avg": {"math": averaged_math, "code": 3.0}}
        return {"domains": ["code", "math"], "tokens": {"code": 100, "math": 300},
                "models": {name: {d: {"loss": loss, "kl": 1.0} for d, loss in per[key].items()}
                           for name, key in (("before", "avg"), ("step 2", "avg"), ("step 4", "last"),
                                             ("averaged", "avg"))}}

    better, worse = choose_final(report(1.96)), choose_final(report(2.04))
    assert better["chosen"] == "averaged" and better["delta"] == pytest.approx(-0.03)
    assert better["loss"] == pytest.approx({"averaged": 2.22, "last": 2.25})
    assert worse == {"chosen": "last", "last": "step 4", "loss": pytest.approx({"averaged": 2.28, "last": 2.25}),
                     "delta": pytest.approx(0.03)}
    text = report_markdown({**report(2.04), "final_choice": worse})
    assert ("**final/ = the last checkpoint (step 4)**: held-out loss 2.2500 nats/token vs 2.2800 for the "
            "checkpoint average (0.0300 lower)") in text


@pytest.mark.parametrize("objective", ["kd", "ce"])
def test_anneal_stage_end_to_end(tmp_path, tiny_teacher_dir, objective):
    cfg = _make_run(tmp_path, tiny_teacher_dir, objective)
    train(cfg, tmp_path)
    main_state = json.loads((checkpoint_dir(tmp_path / "train", 9) / "trainer_state.json").read_text())
    out = anneal(cfg, tmp_path)

    manifest = read_manifest(out, "anneal")
    assert manifest["main_steps"] == 9 and manifest["num_steps"] == 3  # 3 / (9 + 3) = 0.25
    assert manifest["start_lr"] == pytest.approx(main_state["lr"])  # wsd without decay: still at the peak
    # weights 0.5/0.25/0.25 with math, code ×3 → 0.5/0.75/0.75 renormalised.
    assert manifest["weights"] == pytest.approx({"code": 0.375, "general": 0.25, "math": 0.375})
    assert manifest["checkpoints"] == ["step-000001", "step-000002", "step-000003"]
    assert set(manifest["inputs"]) >= {"data", "train"}

    # LR linear from the main run's LR towards 0.
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    assert lrs == pytest.approx([main_state["lr"] * (1 - s / 3) for s in range(3)])
    # The data position continues the main run's: the draw counter goes on from where it stopped.
    last = json.loads((checkpoint_dir(out, 3) / "trainer_state.json").read_text())
    assert last["ranks"][0]["sampler"]["draw"] == main_state["ranks"][0]["sampler"]["draw"] + 3 * 2
    assert last["ranks"][0]["sampler"]["weights"] == pytest.approx(manifest["weights"])
    # The realised mix is the replayed draws of the phase: 6 draws, so shares are multiples of 1/6.
    assert json.loads((out / "phase_start.json").read_text())["ranks"] == main_state["ranks"]
    mix = manifest["realised_mix"]
    assert sum(mix.values()) == pytest.approx(1.0) and all(round(v * 6, 6) == round(v * 6) for v in mix.values())

    # averaged/ is the exact average of the three annealing checkpoints; final/ is whichever of it and the
    # last checkpoint has the lower held-out loss, and a loadable HF folder.
    states = [load_file(str(checkpoint_dir(out, s) / "model.safetensors")) for s in (1, 2, 3)]
    averaged = load_file(str(out / "averaged" / "model.safetensors"))
    for key in averaged:
        torch.testing.assert_close(averaged[key], (sum(s[key].double() for s in states) / 3).float(), rtol=0, atol=1e-7)
    report = json.loads((out / "report.json").read_text())
    choice = manifest["final_choice"]
    assert choice == report["final_choice"] == choose_final(report)
    expected = averaged if choice["chosen"] == "averaged" else states[-1]
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    for other in ("averaged", "last"):  # rebuilt from its source whichever it held before
        _install_final({"chosen": other}, checkpoint_dir(out, 3), out)
        final = load_file(str(out / "final" / "model.safetensors"))
        assert all(torch.equal(final[k], (averaged if other == "averaged" else states[-1])[k]) for k in final)
        AutoTokenizer.from_pretrained(out / "final")

    assert list(report["models"]) == ["before", "step 1", "step 2", "step 3", "averaged"]
    for per in report["models"].values():
        assert set(per) == set(DOMAINS)
        assert all(v["loss"] > 0 and v["kl"] >= 0 for v in per.values())
    text = (out / "report.md").read_text()
    assert "| averaged |" in text and "Averaged − last checkpoint (step 3)" in text
    assert f"**final/ = {'the checkpoint average' if choice['chosen'] == 'averaged' else 'the last checkpoint'}" in text
    assert (out / "report.png").stat().st_size > 5000
    assert anneal(cfg, tmp_path) == out  # complete: returns at once


def test_anneal_on_its_own_from_an_hf_folder(tmp_path, tiny_teacher_dir):
    """From a bare HF folder (no optimizer state, no train stage): fresh optimizer, explicit start LR,
    EMA-weighted average."""
    cfg = _make_run(tmp_path, tiny_teacher_dir, "ce", start_lr=1e-3, num_checkpoints=2, ema_decay=0.5)
    cfg.train.max_steps = 6  # the main budget this phase is a fraction of
    out = anneal(cfg, tmp_path, init_from=tmp_path / "student_init")
    manifest = read_manifest(out, "anneal")
    assert manifest["num_steps"] == 2 and manifest["start_lr"] == 1e-3
    assert "train" not in manifest["inputs"]
    assert not checkpoint_dir(out, 0).exists()  # nothing to continue from
    record = json.loads((out / "averaged" / "averaged_from.json").read_text())
    assert record["weights"] == pytest.approx([1 / 3, 2 / 3])
