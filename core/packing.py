"""Packed sequences: several documents in one row, kept apart.

A packed row carries `position_ids` that restart at 0 at each document start (as in Llama 3). From them we
derive document ids and a block-diagonal causal mask, so a token attends only to earlier tokens of its own
document, exactly as if each document had been run on its own. `document_attention` gets the same result
without the mask, by running causal attention document by document (the teacher's capture uses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


DOCUMENT_ATTENTION = "document_sdpa"


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """`[L]` position ids of one packed row → the `[start, end)` column spans of its documents.

    A document starts at column 0 (a row may begin inside a document carried over from the previous row) and
    wherever the position id is 0 (the same rule as `document_ids`).
    """
    pos = position_ids.tolist()
    starts = [0] + [t for t in range(1, len(pos)) if pos[t] == 0]
    return list(zip(starts, starts[1:] + [len(pos)], strict=True))


def document_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, packed_spans: list[list[tuple[int, int]]],
                  scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over packed rows without an `[B, 1, L, L]` mask: plain causal SDPA on each document's span
    (`packed_spans[b]` = `document_spans` of row b).

    query `[B, Hq, L, D]`, key/value `[B, Hkv, L, D]` → output `[B, L, Hq, D]` (the layout transformers'
    attention functions return). Same result as the block-diagonal mask of `document_causal_mask`, but every
    call takes the kernels' causal fast path (no mask to read, no skipped blocks computed, grouped KV heads not
    copied) and memory does not grow as L²: worth it for capture, where the teacher's forward is the cost.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    out = query.new_empty(batch, length, heads, dim)
    for b, spans in enumerate(packed_spans):
        for start, end in spans:
            out[b:b + 1, start:end], _ = sdpa_attention_forward(
                module, query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                None, scaling=scaling, dropout=dropout, is_causal=True)
    return out, None


@contextmanager
def document_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a transformers model attends with `document_sdpa`: call it with
    `packed_spans=[document_spans(row) for row in position_ids]` and no attention mask. Its previous attention
    implementation is restored on exit, so generation with padding masks keeps working."""
    from transformers import AttentionInterface

    AttentionInterface.register(DOCUMENT_ATTENTION, document_sdpa)
    previous = model.config._attn_implementation
    model.set_attn_implementation(DOCUMENT_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def training_positions(input_ids: torch.Tensor, position_ids: torch.Tensor,
                       loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` rows → `(select, labels)`: flat indices `[N]` of positions t whose next token is a target
    inside the same document, and those next tokens `[N]`."""
    batch, length = input_ids.shape
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[:, :-1] = (loss_mask[:, 1:] != 0) & (position_ids[:, 1:] != 0)
    select = valid.reshape(-1).nonzero().squeeze(-1)
    next_ids = torch.zeros_like(input_ids)
    next_ids[:, :-1] = input_ids[:, 1:]
    return select, next_ids.reshape(-1)[select]
