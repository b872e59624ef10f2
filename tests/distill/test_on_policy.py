"""On-policy distillation (`train.objective: on_policy`) on real tiny models: the 1-layer student samples
completions to real prompts through the real SmolLM2 chat template, the 2-layer tiny teacher scores them."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_llama
from test_trainer import kill_after_step, run_trainer_cli

from core.artifacts import read_manifest, sha256_file, write_manifest
from core.checkpoint import list_checkpoints
from core.config import ConfigError, TeacherConfig, from_dict, to_dict
from core.packed import write_packed_shard
from core.sampling import completion_rows, keep_through_eos, sample_completions
from distill.on_policy import PromptSampler, TeacherUnavailableError, check_served_teacher, encode_training_prompts
from distill.trainer import read_metrics, train
from evaluation.tasks.on_policy import reverse_kl_on_samples

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 128
PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("Add 10 and 6.", "16"), ("What is 9 + 9?", "18"),
            ("Subtract 5 from 12.", "7"), ("What is 1 + 8?", "9")]


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "answer": a, "id": f"p{i}"}) + "\n"
                            for i, (q, a) in enumerate(PROBLEMS)))
    return path


def make_on_policy_run(run_dir: Path, teacher_dir: Path, **train_overrides):
    """A run directory (data/ with a few rows, student_init/ a 1-layer LLaMA) and its on-policy config."""
    from transformers import AutoTokenizer

    from teachers.resolve import teacher_identity

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    identity = teacher_identity(str(teacher_dir), None, tok, 49152)
    data_dir = run_dir / "data"
    rows = torch.randint(100, 49000, (4, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    shard = write_packed_shard(data_dir / "train" / "000-000000.safetensors", {
        "input_ids": rows.to(torch.int32), "position_ids": torch.arange(SEQ_LEN, dtype=torch.int32).repeat(4, 1),
        "loss_mask": torch.ones(4, SEQ_LEN, dtype=torch.uint8), "domain": torch.zeros(4, dtype=torch.int16)})
    write_manifest(data_dir, "data", config={}, teacher=identity, domains=["math"], num_train=4, num_heldout=0,
                   seq_len=SEQ_LEN, train_shards=[shard])
    init_dir = make_tiny_llama(run_dir / "student_init", teacher_dir, layers=1, seed=1)
    write_manifest(init_dir, "student", config={}, teacher=identity)
    prompts = write_prompts(run_dir / "prompts.jsonl")
    train_cfg = {"objective": "on_policy", "loss": "reverse_kl", "ce_weight": 0.0, "teacher_source": "online",
                 "prompts": [f"jsonl:{prompts}"], "max_new_tokens": 10, "batch_size": 2, "max_steps": 4,
                 "save_every": 2, "keep_last": 2, "log_every": 1, "lr": 2e-3, "warmup_steps": 1,
                 "loss_chunk_size": 16, "teacher_retry_wait_s": 0.0, **train_overrides}
    return from_dict({"teacher": {"model": str(teacher_dir)},
                      "data": {"seq_len": SEQ_LEN, "sources": [{"name": "math", "domain": "math"}]},
                      "capture": {"top_k": 8}, "train": train_cfg})


# ---------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------


def test_prompt_sampler_splits_draws_across_ranks_and_resumes():
    one = PromptSampler(5, seed=3)
    stream = one.take(10)
    assert stream.tolist() == list(range(10))
    # Each epoch of 5 draws is a permutation of the prompts, reshuffled per epoch.
    epochs = [[one.prompt_of(d) for d in stream[i:i + 5]] for i in (0, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and epochs[0] != epochs[1]
    ranks = [PromptSampler(5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    taken = [s.take(3) for s in ranks]
    assert sorted(np.concatenate(taken).tolist()) == list(range(6))
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"draw": 6, "num_prompts": 5}
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert resumed.take(2).tolist() == [6, 7]
    with pytest.raises(ValueError, match="same train.prompts"):
        PromptSampler(4, seed=3).load_state_dict(resumed.state_dict())


def test_completion_rows_train_on_completion_tokens_only():
    ids, pos, select, labels = completion_rows([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 12, 0]]
    # The padding restarts the positions: a document of its own that nothing attends across.
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]
    # Row 0: positions 2, 3 predict 9, 2; row 1: positions 0, 1, 2 predict 10, 11, 12.
    assert select.tolist() == [2, 3, 5, 6, 7]
    assert labels.tolist() == [9, 2, 10, 11, 12]
    assert keep_through_eos([4, 2, 7, 7], {2}) == [4, 2] and keep_through_eos([4, 5], {2}) == [4, 5]


def test_student_samples_are_a_function_of_the_seed(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    prompts = [[1, 2, 3, 4], [5, 6]]
    kwargs = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "pad_id": 0, "eos_ids": {2}}
    before = torch.random.get_rng_state()
    a = sample_completions(model, prompts, seed=11, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training RNG is left alone
    assert a == sample_completions(model, prompts, seed=11, **kwargs)
    assert a != sample_completions(model, prompts, seed=12, **kwargs)
    assert all(0 < len(c) <= 12 for c in a)
    # Reverse KL on the samples equals the per-sequence computation without padding or batching.
    total, count = reverse_kl_on_samples(model, model, prompts, a, pad_id=0)
    assert total == pytest.approx(0.0, abs=1e-4) and count == sum(len(c) for c in a)
    other = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    total, count = reverse_kl_on_samples(model, other, prompts, a, pad_id=0, batch_size=1)
    expected = 0.0
    with torch.no_grad():
        for prompt, completion in zip(prompts, a, strict=True):
            seq = torch.tensor([prompt + completion])
            logq = torch.log_softmax(model(seq).logits[0, len(prompt) - 1:-1].double(), -1)
            logp = torch.log_softmax(other(seq).logits[0, len(prompt) - 1:-1].double(), -1)
            expected += float((logq.exp() * (logq - logp)).sum())
    assert total == pytest.approx(expected, rel=1e-4)


def test_bad_on_policy_settings_are_refused_by_name(tiny_teacher_dir, tmp_path):
    base = {"objective": "on_policy", "ce_weight": 0.0, "max_steps": 2}
    for bad, match in (({"max_new_tokens": 0}, "train.max_new_tokens: must be > 0, got 0"),
                       ({"on_policy_fraction": 1.5}, "train.on_policy_fraction"),
                       ({"ce_weight": 0.1}, "train.ce_weight: 0.1"),
                       ({"prompts": []}, "train.prompts"),
                       ({"max_steps": 0}, "train.max_steps"),
                       ({"loss": "sampled_reverse_kl", "on_policy_fraction": 0.5}, "sampled_reverse_kl"),
                       ({"sample_top_p": 0.0}, "train.sample_top_p"),
                       ({"student_generation": "vllm", "vllm_sync_every": 0}, "train.vllm_sync_every: must be > 0"),
                       ({"vllm_gpu_memory_utilization": 1.5}, "train.vllm_gpu_memory_utilization: must be in"),
                       ({"student_generation": "vllm", "save_every": 5, "vllm_sync_every": 2},
                        "train.vllm_sync_every: 2 must divide train.save_every=5"),
                       ({"vllm_dtype": "int8"}, "train.vllm_dtype")):
        with pytest.raises(ConfigError, match=match):
            from_dict({"train": {**base, **bad}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="needs train.objective=on_policy"):
        from_dict({"train": {"loss": "sampled_reverse_kl"}})
    with pytest.raises(ConfigError, match="train.student_generation: vllm samples the student's completions of "
                                          "objective on_policy; train.objective is 'kd'"):
        from_dict({"train": {"student_generation": "vllm"}})
    assert from_dict({"train": {**base, "student_generation": "vllm", "save_every": 4, "vllm_sync_every": 2}})

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompts = write_prompts(tmp_path / "p.jsonl")
    cfg = from_dict({"train": {**base, "prompts": [f"jsonl:{prompts}"], "max_new_tokens": 40}})
    names, ids = encode_training_prompts(cfg.train, tok, context=SEQ_LEN)
    assert len(names) == len(PROBLEMS) and all(len(i) + 40 <= SEQ_LEN for i in ids)
    with pytest.raises(ValueError, match=r"prompt jsonl:\S+/p0 \(jsonl:\S+\) is \d+ tokens; with "
                                         r"train.max_new_tokens=40 it does not fit the context of 50 \(data.seq_len\)"):
        encode_training_prompts(cfg.train, tok, context=50)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "  ", "answer": "1"}) + "\n")
    cfg = from_dict({"train": {**base, "prompts": [f"jsonl:{tmp_path / 'empty.jsonl'}"]}})
    with pytest.raises(ValueError, match=r"empty.jsonl:1: needs a non-empty 'prompt'"):
        encode_training_prompts(cfg.train, tok, context=SEQ_LEN)


def test_a_teacher_server_that_is_down_is_named(tiny_teacher_dir):
    from transformers import AutoTokenizer

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = TeacherConfig(model=str(tiny_teacher_dir), backend="vllm-server", server_url=f"http://127.0.0.1:{port}")
    with pytest.raises(RuntimeError, match=rf"teacher.server_url=http://127.0.0.1:{port}: cannot reach"):
        check_served_teacher(cfg, tiny_teacher_dir, AutoTokenizer.from_pretrained(tiny_teacher_dir))


# ---------------------------------------------------------------------------------------------------
# The train stage
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {"loss": "jsd", "beta": 0.5, "on_policy_fraction": 0.5, "sample_temperature": 0.9},
    {"loss": "sampled_reverse_kl", "capture.top_k": 1},
], ids=["jsd-gkd-mix", "sampled-k1"])
def test_on_policy_train_stage(tmp_path, tiny_teacher_dir, overrides):
    overrides = dict(overrides)
    top_k = overrides.pop("capture.top_k", 8)
    cfg = make_on_policy_run(tmp_path, tiny_teacher_dir, **overrides)
    cfg.capture.top_k = top_k
    out = train(cfg, tmp_path)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["ce"] > 0 for r in records)
    assert all(r["student_samples"] + r["teacher_samples"] == 2 for r in records)
    mixed = cfg.train.on_policy_fraction < 1
    assert sum(r["teacher_samples"] for r in records) > 0 if mixed else all(r["teacher_samples"] == 0 for r in records)
    assert sum(r["student_samples"] for r in records) > 0
    # Only completion tokens are trained on: at most max_new_tokens per sequence.
    assert all(0 < r["positions"] <= 2 * cfg.train.max_new_tokens for r in records)
    assert records[-1]["tokens"] == sum(r["positions"] for r in records)
    if cfg.train.loss == "jsd":
        assert all(r["kd"] > 0 for r in records)
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["ranks"][0]["sampler"] == {"draw": 8, "num_prompts": len(PROBLEMS)}
    assert read_manifest(out, "train")["config"]["objective"] == "on_policy"
    assert (out / "final" / "config.json").is_file()


def test_a_failing_teacher_is_retried_then_stops_with_the_checkpoint_kept(tmp_path, tiny_teacher_dir, monkeypatch):
    """One scoring call per step here (λ = 1, no accumulation). A transient failure is retried and the run goes
    on; a teacher that stays down stops the run before the optimizer step, and a rerun resumes."""
    from teachers.hf_backend import TransformersBackend

    real = TransformersBackend.score
    calls = {"n": 0, "fail": lambda n: n == 3}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["fail"](calls["n"]):
            raise RuntimeError("http://teacher:8000/v1/completions: cannot reach the vLLM server")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TransformersBackend, "score", flaky)
    out = train(make_on_policy_run(tmp_path / "a", tiny_teacher_dir, teacher_retries=1), tmp_path / "a")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert calls["n"] == 5

    calls["n"], calls["fail"] = 0, lambda n: n > 2  # steps 1-2 (checkpoint at 2), then the teacher is gone
    cfg = make_on_policy_run(tmp_path / "b", tiny_teacher_dir, teacher_retries=2, max_steps=6, keep_last=3)
    with pytest.raises(TeacherUnavailableError, match=r"train step 3: teacher scoring: the teacher failed 3 "
                                                      r"time\(s\).*step-000002 is kept"):
        train(cfg, tmp_path / "b")
    assert calls["n"] == 5
    run = tmp_path / "b" / "train"
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2] and not (run / "final").exists()
    kept = sha256_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    calls["fail"] = lambda n: False  # the teacher is back: the rerun resumes from the kept checkpoint
    train(cfg, tmp_path / "b")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sha256_file(run / "checkpoints" / "step-000002" / "model.safetensors") == kept


def test_sigkill_then_resume_samples_and_scores_the_same(tmp_path, tiny_teacher_dir):
    """`kill -9` an on-policy run between checkpoints, resume, and compare every step's loss (a function of
    the student's own samples) with an uninterrupted run."""
    steps, runs = 10, {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        cfg = make_on_policy_run(runs[name], tiny_teacher_dir, max_steps=steps, save_every=3, keep_last=1,
                                 on_policy_fraction=0.75, loss="jsd")
        (runs[name] / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    straight = run_trainer_cli(runs["straight"] / "config.yaml", runs["straight"])
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()[-3000:]

    metrics = runs["killed"] / "train" / "metrics.jsonl"
    assert kill_after_step(runs["killed"], 5) < steps  # past the checkpoint at 3: steps 4-5 are redone

    resumed = run_trainer_cli(runs["killed"] / "config.yaml", runs["killed"])
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0 and "resumed from" in output, output[-3000:]
    a = read_metrics(runs["straight"] / "train" / "metrics.jsonl")
    b = read_metrics(metrics)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 and ra["positions"] == rb["positions"], (ra, rb)
        assert (ra["student_samples"], ra["teacher_samples"]) == (rb["student_samples"], rb["teacher_samples"])
    assert ((runs["straight"] / "train" / "final" / "model.safetensors").read_bytes()
            == (runs["killed"] / "train" / "final" / "model.safetensors").read_bytes())
