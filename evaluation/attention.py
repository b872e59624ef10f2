"""Grouped-query attention without copying the KV cache, for fast batched decoding on a CPU.

transformers' SDPA path expands grouped K/V heads to one per query head (`repeat_kv`) whenever a padding
mask is present — always, with left-padded batches — which copies the whole KV cache `groups` times per
layer and step; on a CPU that copy is a large share of decoding time (a profile of SmolLM2-135M shows it).
Here the `groups` query heads that share a K/V head are folded into the query-length axis instead:
query `[B, H, Lq, D]` → `[B, H_kv, groups·Lq, D]`, the mask repeated `groups` times along its query axis,
one plain SDPA call against the un-copied `[B, H_kv, Lk, D]` keys and values. Same arithmetic, so the
outputs match the stock implementation to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "grouped_sdpa"


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for `AttentionInterface`: returns `[B, Lq, H, D]` and no attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    if groups == 1 or dropout > 0.0 or per_head_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, q_len, d = query.shape
    h_kv, k_len = key.shape[1], key.shape[2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # Without a mask the stock path relies on SDPA's `is_causal`, which would be wrong once query rows
        # of several heads are stacked: build the causal mask (bottom-right aligned, as with a KV cache).
        attention_mask = (torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
                          if causal and q_len > 1 else None)
    folded_q = query.reshape(b, h_kv, groups * q_len, d)
    mask = None
    if attention_mask is not None:
        m = attention_mask if attention_mask.dim() == 4 else attention_mask[None, None]
        m = m[..., :k_len]
        mask = m[:, :, None].expand(m.shape[0], m.shape[1], groups, q_len, k_len).reshape(
            m.shape[0], m.shape[1], groups * q_len, k_len)
    out = F.scaled_dot_product_attention(folded_q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `grouped_sdpa` a known attention implementation (same masks as "sdpa"); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
