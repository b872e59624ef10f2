"""The `student` stage: scratch and teacher-pruned initialisation, on tiny LLaMA teachers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.artifacts import ArtifactError, read_manifest, write_manifest
from core.config import load_config
from core.packed import write_packed_shard
from students.configs import STUDENT_SIZES, StudentSize, count_parameters
from students.init import init_student
from students.pruning import even_layers
from teachers.resolve import load_tokenizer, teacher_identity

TEXT = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]


def _logits(folder, texts=TEXT):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits for t in texts]


def _cfg(teacher_dir, *overrides):
    return load_config(None, [f"teacher.model={teacher_dir}", *overrides])


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, smollm2_dir):
    """3 layers, 4 heads over 2 KV heads, MLP 128 — with dead parts planted so the right answer is known:
    layer 0 is an identity (o_proj and down_proj zero), KV group 0 (heads 0, 1) outputs zero (v_proj rows
    zero) and MLP neurons 0..63 are zero (up_proj rows zero) in every layer. The dead parts come first, so
    "keep the first ones" or "evenly spaced" would pick them."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("wide_teacher"), smollm2_dir, layers=3, hidden=128, heads=4,
                             kv_heads=2, intermediate=128, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.v_proj.weight[:32] = 0
            layer.mlp.up_proj.weight[:64] = 0
            if i == 0:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return folder


def test_student_keeping_all_layers_reproduces_teacher_exactly(tiny_teacher_dir, tmp_path, capsys):
    out = init_student(_cfg(tiny_teacher_dir, "student.size=teacher-full"), tmp_path)
    for got, want in zip(_logits(out), _logits(tiny_teacher_dir), strict=True):
        assert torch.equal(got, want)
    manifest = read_manifest(out, "student")
    tok = load_tokenizer(tiny_teacher_dir)
    assert manifest["teacher"] == teacher_identity(str(tiny_teacher_dir), None, tok, 49152)
    assert manifest["kept_layers"] == [0, 1] and manifest["size"] == "teacher-full"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert manifest["parameters"] == count_parameters(model) == manifest["teacher_parameters"]
    assert f"{manifest['parameters']:,} parameters" in capsys.readouterr().out
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 100000.0


def test_complete_stage_returns_without_rewriting(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir, "student.size=teacher-full")
    out = init_student(cfg, tmp_path)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert init_student(cfg, tmp_path) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_importance_depth_pruning_drops_the_identity_layer_exactly(wide_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "test-2l", StudentSize("test", layers=2))
    out = init_student(_cfg(wide_teacher, "student.size=test-2l", "student.layer_selection=importance"), tmp_path)
    manifest = read_manifest(out, "student")
    assert manifest["kept_layers"] == [1, 2]
    assert manifest["importance"]["layer_block_influence"][0] == pytest.approx(0.0, abs=1e-6)
    assert manifest["calibration"]["source"] == "built-in calibration sentences"
    for got, want in zip(_logits(out), _logits(wide_teacher), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_even_depth_pruning_keeps_first_and_last():
    assert even_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert even_layers(30, 30) == list(range(30))
    assert even_layers(2, 2) == [0, 1]
    assert even_layers(5, 1) == [0]


def test_width_pruning_by_activation_importance_drops_dead_heads_and_neurons(wide_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "test-w", StudentSize("test", heads=2, kv_heads=1, intermediate_size=64))
    out = init_student(_cfg(wide_teacher, "student.size=test-w"), tmp_path)
    manifest = read_manifest(out, "student")
    assert manifest["kept_kv_heads"] == [[1], [1], [1]]
    assert manifest["kept_heads"] == [[2, 3], [2, 3], [2, 3]]
    assert manifest["kept_neurons"] == [64, 64, 64]
    student = AutoModelForCausalLM.from_pretrained(out)
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 128) and attn.k_proj.weight.shape == (32, 128)
    assert student.model.layers[0].mlp.down_proj.weight.shape == (128, 64)
    # The dropped heads and neurons contributed exactly zero, so the narrower student is the same function.
    for got, want in zip(_logits(out), _logits(wide_teacher), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pruned_student_loads_and_trains(wide_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "test-1l-w", StudentSize("test", layers=1, heads=2, kv_heads=1,
                                                                  intermediate_size=32))
    out = init_student(_cfg(wide_teacher, "student.size=test-1l-w"), tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batch = tok(TEXT[0], return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_scratch_init_is_seeded_and_sized(tiny_teacher_dir, tmp_path):
    a = init_student(_cfg(tiny_teacher_dir, "student.size=tiny-2l", "student.init=scratch"), tmp_path / "a")
    b = init_student(_cfg(tiny_teacher_dir, "student.size=tiny-2l", "student.init=scratch"), tmp_path / "b")
    manifest = read_manifest(a, "student")
    assert manifest["parameters"] == 6_685_312 and "kept_layers" not in manifest
    for got, want in zip(_logits(a), _logits(b), strict=True):
        assert torch.equal(got, want)


def test_calibration_comes_from_the_run_data_and_checks_its_tokenizer(wide_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "test-2l", StudentSize("test", layers=2))
    tok = load_tokenizer(wide_teacher)
    identity = teacher_identity(str(wide_teacher), None, tok, 49152)
    data = tmp_path / "data"
    ids = torch.randint(0, 49152, (3, 16), dtype=torch.int32)
    pos = torch.arange(16, dtype=torch.int32).repeat(3, 1)
    shard = write_packed_shard(data / "train" / "000-000000.safetensors", {
        "input_ids": ids, "position_ids": pos, "loss_mask": torch.ones(3, 16, dtype=torch.uint8),
        "domain": torch.zeros(3, dtype=torch.int16)})
    layout = {"seq_len": 16, "train_shards": [shard]}
    write_manifest(data, "data", config={}, teacher={**identity, "tokenizer_hash": "other"}, **layout)
    cfg = _cfg(wide_teacher, "student.size=test-2l", "student.layer_selection=importance",
               "student.calibration_sequences=2")
    with pytest.raises(ArtifactError, match="tokenizer"):
        init_student(cfg, tmp_path)
    write_manifest(data, "data", config={}, teacher=identity, **layout)
    manifest = read_manifest(init_student(cfg, tmp_path), "student")
    assert manifest["calibration"] == {"source": f"{data} (first 2 training rows)", "tokens": 32}
    assert manifest["kept_layers"] == [1, 2]


def test_explicit_layers_override_selection(wide_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "test-2l", StudentSize("test", layers=2))
    out = init_student(_cfg(wide_teacher, "student.size=test-2l", "student.layers=[1,0]"), tmp_path)
    manifest = read_manifest(out, "student")
    assert manifest["kept_layers"] == [0, 1] and manifest["layer_selection"] == "explicit"
    assert "importance" not in manifest
