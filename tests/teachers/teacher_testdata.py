"""Test data for the teacher tests: packed rows with several documents, and a RUN/data folder built from them."""

from __future__ import annotations

from pathlib import Path

import torch

from core.artifacts import write_manifest
from core.packed import write_packed_shard
from teachers.resolve import load_tokenizer, teacher_identity


def packed_rows(num: int, length: int, vocab: int, eos: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, position_ids int32 [num, length]: documents of random length (2..length/2) back to back,
    each ending with `eos`, position ids restarting at 0 per document (a row may start mid-document)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num, length), generator=gen, dtype=torch.int32)
    pos = torch.empty(num, length, dtype=torch.int32)
    for row in range(num):
        t = 0
        while t < length:
            doc = int(torch.randint(2, max(3, length // 2), (1,), generator=gen))
            end = min(t + doc, length)
            pos[row, t:end] = torch.arange(end - t, dtype=torch.int32)
            if end - t == doc:
                ids[row, end - 1] = eos
            t = end
    return ids, pos


def write_data_dir(run_dir: Path, model_dir: Path, input_ids: torch.Tensor, position_ids: torch.Tensor) -> Path:
    """A RUN/data folder in the data stage's format (docs/ARCHITECTURE.md) for the teacher in `model_dir`."""
    out = Path(run_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    num = input_ids.shape[0]
    shard = write_packed_shard(out / "train" / "000-000000.safetensors", {
        "input_ids": input_ids, "position_ids": position_ids,
        "loss_mask": torch.ones_like(input_ids, dtype=torch.uint8), "domain": torch.zeros(num, dtype=torch.int16)})
    tok = load_tokenizer(model_dir)
    write_manifest(out, "data", config={}, teacher=teacher_identity(str(model_dir), None, tok, 49152),
                   domains=["general"], num_train=num, num_heldout=0, seq_len=int(input_ids.shape[1]),
                   train_shards=[shard])
    return out
