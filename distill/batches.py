"""Micro-batches for the training loop: packed rows read from disk, their training positions and the teacher's
targets at those positions (from the logit store, or an online teacher scoring the same rows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.packed import PackedRows
from core.packing import training_positions
from core.records import TopK


@dataclass
class MicroBatch:
    """One micro-batch of `B` packed rows of `L` tokens, on the training device.

    `select` int64 `[N]`: flat indices (into `B·L`) of the training positions; `labels` int64 `[N]`: their next
    tokens; `target`: the teacher's top-k at those positions (None for the "ce" objective).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    select: torch.Tensor
    labels: torch.Tensor
    target: TopK | None

    @property
    def num_positions(self) -> int:
        return int(self.select.numel())


class OfflineTargets:
    """Teacher targets read from the logit store (`RUN/logits/`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __call__(self, indices: np.ndarray, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 select: torch.Tensor) -> TopK:
        ids, logprobs, tail = self.store.batch(indices)
        return TopK(torch.as_tensor(np.asarray(ids), dtype=torch.int64),
                    torch.as_tensor(np.asarray(logprobs), dtype=torch.float32),
                    torch.as_tensor(np.asarray(tail), dtype=torch.float32)).flatten().select(select)


class OnlineTargets:
    """Teacher targets computed on the fly by a teacher backend held in this process (small teachers)."""

    def __init__(self, backend: Any, k: int) -> None:
        self.backend = backend
        self.k = k

    def __call__(self, indices: np.ndarray, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 select: torch.Tensor) -> TopK:
        rows = self.backend.score(input_ids, position_ids, self.k)
        ids = torch.cat([r.ids.reshape(-1, self.k) for r in rows]).to(torch.int64).cpu()
        logprobs = torch.cat([r.logprobs.reshape(-1, self.k) for r in rows]).float().cpu()
        tail = torch.cat([r.tail_logmass.reshape(-1) for r in rows]).float().cpu()
        return TopK(ids, logprobs, tail).select(select)


TargetSource = Callable[[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor], TopK]


def make_micro_batch(rows: PackedRows, indices: np.ndarray, targets: TargetSource | None,
                     device: torch.device) -> MicroBatch:
    """Read rows `indices` `[B]` from disk and find their training positions and teacher targets."""
    arrays = {name: torch.from_numpy(a.astype(np.int64)) for name, a in rows.take(indices).items()}
    input_ids, position_ids = arrays["input_ids"], arrays["position_ids"]
    select, labels = training_positions(input_ids, position_ids, arrays["loss_mask"])
    target = targets(indices, input_ids, position_ids, select) if targets is not None else None
    if target is not None:
        target = target.to(device)
    return MicroBatch(input_ids.to(device), position_ids.to(device), select.to(device), labels.to(device),
                      target)
