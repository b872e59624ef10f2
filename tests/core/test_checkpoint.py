"""Checkpoints: HF-loadable layout, exact optimizer/RNG round trip, ordering, pruning, atomicity."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from core.artifacts import ArtifactError
from core.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _save(out, step, model, optimizer, **state):
    return save_checkpoint(out, step, model_state=model.state_dict(), model=model,
                           optimizer_state=optimizer.state_dict(), state={"lr": 0.1, **state})


def test_round_trip_is_exact(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 64, (2, 5))).loss.backward()
    optimizer.step()
    path = _save(tmp_path, 7, model, optimizer, ranks=[{"sampler": {"draw": np.int64(14)}}])
    assert path == checkpoint_dir(tmp_path, 7) and path.name == "step-000007"

    loaded = AutoModelForCausalLM.from_pretrained(path)  # plain HF folder
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    state, opt_state = load_checkpoint(path)
    assert state["step"] == 7 and state["ranks"][0]["sampler"]["draw"] == 14
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    fresh.load_state_dict(opt_state)
    for a, b in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_rng_state_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_listing_pruning_and_temp_folders(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (2, 4, 6, 8, 10):
        _save(tmp_path, step, model, optimizer)
    # A save interrupted by kill -9 leaves only a hidden temp folder, never a step-* one.
    (tmp_path / "checkpoints" / ".step-000012.abc.tmp").mkdir()
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 4, 6, 8, 10]
    assert latest_checkpoint(tmp_path).name == "step-000010"
    deleted = prune_checkpoints(tmp_path, keep_last=2, protected={4})
    assert [checkpoint_step(p) for p in deleted] == [2, 6]
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [4, 8, 10]
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_overwriting_a_step_replaces_it_atomically(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    _save(tmp_path, 3, model, optimizer, tokens=1)
    _save(tmp_path, 3, model, optimizer, tokens=2)
    assert load_checkpoint(checkpoint_dir(tmp_path, 3))[0]["tokens"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]


def test_broken_checkpoints_are_named(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    path = _save(tmp_path, 1, model, optimizer)
    (path / "optimizer.pt").unlink()
    with pytest.raises(ArtifactError, match="optimizer.pt"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="trainer_state.json"):
        load_checkpoint(path)
    with pytest.raises(ArtifactError, match="not a checkpoint folder"):
        checkpoint_step(tmp_path / "final")
