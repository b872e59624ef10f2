"""Named student sizes: validation, LLaMA configs derived from a teacher, parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from students.configs import (
    STUDENT_SIZES,
    StudentSize,
    StudentSizeError,
    count_parameters,
    student_llama_config,
)

SMOLLM2 = LlamaConfig(
    vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def test_every_shipped_size_builds_for_the_default_teacher():
    for name in STUDENT_SIZES:
        c = student_llama_config(name, SMOLLM2)
        assert c.vocab_size == 49152 and c.model_type == "llama" and c.hidden_act == "silu"
        assert c.num_attention_heads % c.num_key_value_heads == 0


def test_pruned_sizes_inherit_teacher_widths():
    c = student_llama_config("smollm2-prune-8l", SMOLLM2)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size) == (8, 576, 9, 3, 64, 1536)
    assert c.rope_parameters["rope_theta"] == 100000.0 and c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.max_position_embeddings) == (1, 2, 8192)
    w = student_llama_config("smollm2-prune-12l-w", SMOLLM2)
    assert (w.num_hidden_layers, w.num_attention_heads, w.num_key_value_heads, w.intermediate_size) == (12, 6, 2, 768)


@pytest.mark.parametrize("name", ["teacher-full", "smollm2-prune-12l-w", "tiny-2l", "small-6l"])
def test_count_parameters_of_config_matches_built_model(name):
    c = student_llama_config(name, SMOLLM2)
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    assert count_parameters(c) == count_parameters(model)


def test_teacher_full_count_is_smollm2_135m():
    assert count_parameters(student_llama_config("teacher-full", SMOLLM2)) == 134_515_008


def test_untied_embeddings_count_the_lm_head():
    tied = LlamaConfig(**{**SMOLLM2.to_dict(), "tie_word_embeddings": True})
    untied = LlamaConfig(**{**SMOLLM2.to_dict(), "tie_word_embeddings": False})
    assert count_parameters(untied) - count_parameters(tied) == 49152 * 576


def test_size_validation_names_the_field(monkeypatch):
    with pytest.raises(StudentSizeError, match="heads .* divisible by kv_heads"):
        StudentSize("bad", heads=6, kv_heads=4).validate("bad")
    with pytest.raises(StudentSizeError, match="hidden_size .*divisible by heads"):
        StudentSize("bad", layers=2, hidden_size=100, heads=3, kv_heads=1, init="scratch").validate("bad")
    with pytest.raises(StudentSizeError, match="layers must be a positive"):
        StudentSize("bad", layers=0).validate("bad")
    with pytest.raises(StudentSizeError, match="unknown size 'nope'"):
        student_llama_config("nope", SMOLLM2)


def test_teacher_init_refuses_shapes_that_are_not_slices_of_the_teacher(monkeypatch):
    monkeypatch.setitem(STUDENT_SIZES, "too-deep", StudentSize("x", layers=31))
    with pytest.raises(StudentSizeError, match="layers=31 exceeds the teacher's 30"):
        student_llama_config("too-deep", SMOLLM2)
    with pytest.raises(StudentSizeError, match="hidden_size=128 must equal the teacher's 576"):
        student_llama_config("tiny-2l", SMOLLM2, init="teacher")
    monkeypatch.setitem(STUDENT_SIZES, "wide-groups", StudentSize("x", heads=8, kv_heads=2))
    with pytest.raises(StudentSizeError, match="4 query heads in a KV group, but the teacher's groups hold 3"):
        student_llama_config("wide-groups", SMOLLM2)


def test_scratch_size_keeps_its_own_shape_but_teacher_vocab():
    c = student_llama_config("tiny-2l", SMOLLM2)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size) == (128, 2, 32, 49152)


def test_sizes_md_matches_the_code():
    from pathlib import Path

    from students.configs import sizes_table

    text = (Path(__file__).resolve().parents[2] / "students" / "SIZES.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(STUDENT_SIZES)
    for row in sizes_table(SMOLLM2):
        cells = [c.strip() for c in rows[row["size"]].split("|")[1:-1]]
        assert cells[1:7] == [row["init"], str(row["layers"]), str(row["hidden"]),
                              f"{row['heads']} / {row['kv_heads']}", str(row["head_dim"]), str(row["intermediate"])]
        assert cells[7].startswith(f"{row['params']:,} ")


def test_print_sizes_lists_counts_and_sizes_that_do_not_fit(tiny_teacher_dir, capsys):
    from students.configs import print_sizes

    print_sizes(str(tiny_teacher_dir))
    out = capsys.readouterr().out
    assert "3.2M parameters" in out.splitlines()[0]
    assert any(line.startswith("tiny-2l") and line.rstrip().endswith("6.7M") for line in out.splitlines())
    assert "smollm2-prune-8l" in out and "layers=8 exceeds the teacher's 2" in out
