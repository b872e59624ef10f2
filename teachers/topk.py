"""Top-k records from what engines return, shared by the teacher backends: the tail log-mass from the top-k,
per-position logprob dicts to sorted tensors, packed rows to per-document prompts and back, completions cut
at EOS."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from core.packing import document_spans
from core.records import TopK

# log(tail mass) when the top-k covers (numerically) all the mass: finite, and e**-100 is 0 in float32.
TAIL_LOGMASS_FLOOR = -100.0


def tail_logmass_from_topk(logprobs: torch.Tensor) -> torch.Tensor:
    """`[..., k]` top-k logprobs → `[...]` log(1 - sum(exp)), computed in float64 and clamped finite.

    Used where only the top-k is known (vLLM); exact only to the precision of the given logprobs, so a tail
    mass below ~1e-6 comes out as noise or the floor.
    """
    total = torch.logsumexp(logprobs.double(), dim=-1).clamp(max=-1e-15)
    tail = torch.log(-torch.expm1(total))
    return tail.clamp(min=TAIL_LOGMASS_FLOOR).float()


def topk_from_logprob_dicts(entries: list[Mapping[int, float]], k: int,
                            where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position dicts {token id: logprob} (the top-k, perhaps plus the actual token) → ids int64 [n, k]
    and logprobs float32 [n, k] sorted by logprob descending, ties broken by token id.

    `where` names the source in the error raised when a position has fewer than k entries.
    """
    ids = torch.empty(len(entries), k, dtype=torch.int64)
    lps = torch.empty(len(entries), k, dtype=torch.float32)
    for row, entry in enumerate(entries):
        if len(entry) < k:
            raise RuntimeError(f"{where}: position {row} has {len(entry)} logprobs, expected at least k={k}")
        best = sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        ids[row] = torch.tensor([tid for tid, _ in best], dtype=torch.int64)
        lps[row] = torch.tensor([lp if math.isfinite(lp) else -math.inf for _, lp in best], dtype=torch.float32)
    return ids, lps


def document_prompts(input_ids: torch.Tensor, position_ids: torch.Tensor, eos_id: int
                     ) -> list[tuple[int, int, int, list[int]]]:
    """Packed rows [B, L] → one prompt per document, for engines that score prompts one by one.

    Each item is (row, start, end, prompt): the document's tokens plus one more (the row's next token, or
    `eos_id` at the row's end). The extra token makes the engine report the distribution at the
    document's last position; being later in the prompt, it cannot change any scored distribution.
    """
    items = []
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row].tolist()
        for start, end in document_spans(position_ids[row]):
            following = tokens[end] if end < len(tokens) else eos_id
            items.append((row, start, end, tokens[start:end] + [following]))
    return items


def assemble_rows(batch: int, length: int, k: int,
                  scored: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]) -> list[TopK]:
    """Per-document (row, start, end, ids [end-start, k], logprobs [end-start, k]) → one TopK per row, the
    tail log-mass derived from the top-k (see tail_logmass_from_topk)."""
    ids = torch.zeros(batch, length, k, dtype=torch.int64)
    lps = torch.full((batch, length, k), float("nan"), dtype=torch.float32)
    for row, start, end, doc_ids, doc_lps in scored:
        ids[row, start:end], lps[row, start:end] = doc_ids, doc_lps
    if torch.isnan(lps).any():
        raise RuntimeError("teacher backend: some positions were not scored")
    return [TopK(ids=ids[b], logprobs=lps[b], tail_logmass=tail_logmass_from_topk(lps[b])) for b in range(batch)]


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """A completion up to (not including) its first EOS token."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i]
    return list(tokens)
