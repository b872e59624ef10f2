"""Checkpoint averaging: exact (weighted) means, a loadable HF folder, clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from distill.averaging import AveragingError, average_checkpoints, ema_weights


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("avg")
    return [make_tiny_llama(root / f"m{seed}", tiny_teacher_dir, seed=seed) for seed in range(3)]


def test_uniform_average_is_the_mean_and_loads(three_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = average_checkpoints(three_models, tmp_path / "avg")
    states = [load_file(str(p / "model.safetensors")) for p in three_models]
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(states[0])
    for key in got:
        expected = (states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3
        torch.testing.assert_close(got[key], expected.to(got[key].dtype), rtol=0, atol=1e-7)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    record = json.loads((out / "averaged_from.json").read_text())
    assert record["weights"] == pytest.approx([1 / 3] * 3)


def test_weighted_average_and_ema_weights(three_models, tmp_path):
    out = average_checkpoints(three_models[:2], tmp_path / "w", weights=[3.0, 1.0])
    a, b = (load_file(str(p / "model.safetensors")) for p in three_models[:2])
    got = load_file(str(out / "model.safetensors"))
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(got[key], (0.75 * a[key].double() + 0.25 * b[key].double()).float(), rtol=0, atol=1e-7)
    assert ema_weights(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert ema_weights(2, 0.0) == [0.0, 1.0]


def test_average_of_one_copy_is_identity(three_models, tmp_path):
    out = average_checkpoints([three_models[0]] * 2, tmp_path / "same")
    a = load_file(str(three_models[0] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], got[k]) for k in a)


def test_tokenizer_from_a_separate_folder(three_models, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(three_models[0] / name, bare / name)
    out = average_checkpoints([bare, bare], tmp_path / "out", tokenizer_from=three_models[1])
    assert (out / "tokenizer.json").is_file()


def test_mismatched_shapes_and_configs_are_refused(three_models, tiny_teacher_dir, tmp_path):
    wider = make_tiny_llama(tmp_path / "wide", tiny_teacher_dir, hidden=128, heads=4, intermediate=256)
    with pytest.raises(AveragingError, match="wide"):
        average_checkpoints([three_models[0], wider], tmp_path / "x")
    other = tmp_path / "other_rope"
    shutil.copytree(three_models[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    cfg.pop("rope_parameters", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AveragingError, match="other_rope.*config differs"):
        average_checkpoints([three_models[0], other], tmp_path / "y")
    with pytest.raises(AveragingError, match="not a folder"):
        average_checkpoints([three_models[0], tmp_path / "missing"], tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
