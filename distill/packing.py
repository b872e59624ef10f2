"""Packed sequences: several documents in one row, kept apart.

A packed row carries `position_ids` that restart at 0 at each document start (as in Llama 3). From them we
derive document ids and a block-diagonal causal mask, so a token attends only to earlier tokens of its own
document, exactly as if each document had been run on its own.
"""

from __future__ import annotations

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, L]` position ids → `[B, L]` document index within each row (0, 0, 0, 1, 1, 2, ...)."""
    return (position_ids == 0).long().cumsum(-1)


def document_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, L]` position ids → additive attention mask `[B, 1, L, L]`: 0 where query i may attend key j
    (same document, j ≤ i), the dtype's minimum elsewhere. Pass it as `attention_mask` to a HF LLaMA."""
    docs = document_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
