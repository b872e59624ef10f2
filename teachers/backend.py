"""One interface for every teacher backend: score packed rows to top-k logprobs, and sample completions.

A backend turns token ids into what offline distillation stores: for every position t of a packed row, the
teacher's k most likely next tokens (the distribution over token t+1) with their raw log-softmax values, and
the log of the probability mass left outside those k. Rows are packed: documents follow each other and
`position_ids` restart at 0 where a document starts; a backend never lets one document see another.

Backends: `transformers` (an in-process forward pass, the embedded default), `vllm` (the offline vLLM engine)
and `vllm-server` (a client for a running OpenAI-compatible vLLM server), chosen by `TeacherConfig.backend`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from distill.config import InputError, TeacherConfig
from distill.packing import document_spans

# log(tail mass) when the top-k covers (numerically) all the mass: finite, and e**-100 is 0 in float32.
TAIL_LOGMASS_FLOOR = -100.0


@dataclass
class TopK:
    """The teacher's top-k next-token distribution for one packed row of L tokens.

    ids: int64 [L, k], top-k token ids at each position (position t predicts token t+1), sorted by logprob
        descending.
    logprobs: float32 [L, k], raw log-softmax values (nats, no temperature).
    tail_logmass: float32 [L], log(1 - sum(exp(logprobs))): the log of the mass outside the top-k, clamped
        to at least TAIL_LOGMASS_FLOOR.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor


class TeacherBackend(Protocol):
    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        """Top-k next-token logprobs of every position of `input_ids` int [B, L]; documents are the runs of
        `position_ids` int [B, L] that start where it is 0 (and at column 0); no attention crosses them."""
        ...

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        """For each prompt, `n` sampled completions as token ids, without the prompt, cut before the first
        EOS (temperature 0 decodes greedily)."""
        ...

    def close(self) -> None:
        ...


def make_backend(cfg: TeacherConfig, model_dir: Path) -> TeacherBackend:
    """The backend named by `cfg.backend`, loading the teacher from the local HF folder `model_dir`."""
    if cfg.backend == "transformers":
        from teachers.hf_backend import TransformersBackend

        return TransformersBackend(cfg, model_dir)
    if cfg.backend == "vllm":
        from teachers.vllm_backend import VLLMBackend

        return VLLMBackend(cfg, model_dir)
    if cfg.backend == "vllm-server":
        from teachers.vllm_backend import VLLMServerBackend

        return VLLMServerBackend(cfg, model_dir)
    raise InputError(f"teacher.backend: unknown backend {cfg.backend!r} (valid: transformers, vllm, vllm-server)")


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the backends
# ---------------------------------------------------------------------------------------------------


def tail_logmass_from_topk(logprobs: torch.Tensor) -> torch.Tensor:
    """`[..., k]` top-k logprobs → `[...]` log(1 - sum(exp)), computed in float64 and clamped finite.

    Used where only the top-k is known (vLLM); exact only to the precision of the given logprobs, so a tail
    mass below ~1e-6 comes out as noise or the floor.
    """
    total = torch.logsumexp(logprobs.double(), dim=-1).clamp(max=-1e-15)
    tail = torch.log(-torch.expm1(total))
    return tail.clamp(min=TAIL_LOGMASS_FLOOR).float()


def topk_from_logprob_dicts(entries: list[Mapping[int, float]], k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def eos_token_ids(model_dir: Path) -> set[int]:
    """The ids that end a generation: generation_config.json's eos_token_id, else the tokenizer's EOS."""
    import json

    gen_path = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    if eos is None:
        from teachers.resolve import load_tokenizer

        eos = load_tokenizer(model_dir).eos_token_id
    if eos is None:
        raise InputError(f"{model_dir}: the teacher defines no EOS token (generation_config.json or tokenizer)")
    return set(eos) if isinstance(eos, list) else {int(eos)}
