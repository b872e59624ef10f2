"""Helpers for the evaluation tests (not a conftest.py: a second one would shadow tests/conftest.py for
`from conftest import ...`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_heldout(folder: Path, *, rows: int = 2, length: int = 24, seed: int = 0) -> Path:
    """A packed held-out file in the data-stage format: each row holds two documents (position ids restart
    at 0 mid-row), the first two targets of row 0 are masked out, domains alternate general/math."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (rows, length), generator=gen, dtype=torch.int32)
    split = length // 3
    pos = torch.cat([torch.arange(split), torch.arange(length - split)]).repeat(rows, 1).int()
    mask = torch.ones(rows, length, dtype=torch.uint8)
    mask[0, :3] = 0
    domain = (torch.arange(rows) % 2).to(torch.int16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "position_ids": pos, "loss_mask": mask, "domain": domain},
              str(folder / "heldout.safetensors"))
    (folder / "manifest.json").write_text(json.dumps({"stage": "data", "complete": True,
                                                      "domains": ["general", "math"]}))
    return folder / "heldout.safetensors"
