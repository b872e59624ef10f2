"""Held-out text for `distill eval` on arbitrary folders: the builtin general/math/code corpora's held-out
split, packed with the teacher's tokenizer exactly as the data stage packs a run's held-out set (it is
built by `distill.data.build_data`), and cached per tokenizer. `distill eval` on model folders uses it."""

from __future__ import annotations

from pathlib import Path

from core.artifacts import tokenizer_hash
from core.config import DataConfig, RunConfig, SourceConfig, TeacherConfig
from distill.data import build_data
from evaluation.cache import eval_cache_dir
from teachers.resolve import load_tokenizer

DOMAINS = ("general", "math", "code")


def default_heldout(teacher_path: Path, *, seq_len: int = 256, sequences_per_domain: int = 8) -> Path:
    """Path of a `heldout.safetensors` (with its data manifest) for the teacher's tokenizer."""
    tok = tokenizer_hash(load_tokenizer(Path(teacher_path)))
    run_dir = eval_cache_dir() / "heldout" / f"{tok}-L{seq_len}-n{sequences_per_domain}"
    cfg = RunConfig(
        teacher=TeacherConfig(model=str(teacher_path)),
        # The data stage also packs a training split; one row per domain keeps that negligible.
        data=DataConfig(sources=[SourceConfig(name=d, kind="builtin", domain=d) for d in DOMAINS],
                        seq_len=seq_len, train_tokens=seq_len * len(DOMAINS),
                        heldout_sequences_per_domain=sequences_per_domain),
    )
    return build_data(cfg, run_dir) / "heldout.safetensors"
