"""A causal LM under evaluation: batched continuation scoring and batched greedy generation.

Works on any Hugging Face causal-LM folder. Generation runs the token prefix all prompts share (a few-shot
header) once, then each batch as `[prefix][left padding][own tokens]` with the prefix's KV cache; HF's
position ids (cumulative sum of the attention mask) give every sequence the positions it would have alone.
Scoring packs a context and all its continuations (the choices of a multiple-choice item) into one row:
each continuation attends to the context and to itself only, with position ids continuing the context's,
so every continuation is scored exactly as if alone while the shared context is computed once; the
vocabulary projection runs only at the positions that predict a continuation token.
`encode_prompts` and `decode_completion` are shared with the vLLM engine (evaluation/vllm_lm.py): both
generation paths start from the same prompt ids and turn generated ids into text the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.artifacts import tokenizer_folder
from evaluation.attention import register
from evaluation.intrinsic import head_logprobs
from teachers.resolve import load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import DynamicCache

HEAD_CHUNK = 512  # target positions per vocabulary projection while scoring


@dataclass
class ContinuationScore:
    """Log-likelihood of one continuation given its context (natural log, summed over its tokens)."""

    logprob: float
    num_tokens: int
    is_greedy: bool  # every continuation token is the model's argmax


class EvalModel:
    """A loaded causal LM plus its tokenizer, with the two batched primitives the tasks need."""

    def __init__(self, path: Path, *, tokenizer_path: Path | None = None, device: str = "auto",
                 dtype: str = "float32") -> None:
        """`tokenizer_path`: where to read the tokenizer when `path` has none (a training checkpoint holds
        only weights and config; students share the teacher's tokenizer)."""

        self.path = Path(path)
        self.model = load_model(self.path, dtype=dtype, device=device)
        self.device = next(self.model.parameters()).device
        if self.model.config._attn_implementation == "sdpa" and self.device.type == "cpu":

            # Same outputs as "sdpa" without copying the KV cache per query head (see evaluation/attention.py).
            self.model.set_attn_implementation(register())
        self.tokenizer = load_tokenizer(tokenizer_folder(self.path, tokenizer_path))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    # ------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ids → `input_ids`, `attention_mask`, each `[B, max_len]`, padded on the left."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[str, str]], batch_size: int = 8) -> list[ContinuationScore]:
        """Log P(continuation | context) for each `(context, continuation)` pair.

        Context and continuation are tokenized separately and concatenated (the split point is then exact).
        Requests that share a context are scored in one row, the context once and every continuation after
        it (`pack_continuations`); a row that would not fit the model is split, its context cut from the
        left. `batch_size` rows run at a time, longest first.
        """
        encoded: dict[str, tuple[list[int], list[tuple[int, list[int]]]]] = {}
        for i, (context, continuation) in enumerate(requests):
            cont = self.encode(continuation, special=False)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-80:]!r}")
            if context not in encoded:
                encoded[context] = (self.encode(context), [])
            encoded[context][1].append((i, cont))
        rows = [row for ctx, conts in encoded.values() for row in _fit_rows(ctx, conts, self.max_length)]
        rows.sort(key=lambda r: -len(r.ids))
        results: list[ContinuationScore | None] = [None] * len(requests)
        for start in range(0, len(rows), batch_size):
            self._score_rows(rows[start:start + batch_size], results)
        return [r for r in results if r is not None]

    def _score_rows(self, rows: list[PackedContinuations], results: list[ContinuationScore | None]) -> None:
        """Score a batch of packed rows (right-padded) into `results` at each continuation's request index."""

        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        branch = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)], pos[b, :len(r.ids)] = torch.tensor(r.ids), torch.tensor(r.pos)
            branch[b, :len(r.ids)] = torch.tensor(r.branch)
        hidden = self.model.get_decoder()(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                                          attention_mask=continuation_mask(branch, self.model.dtype).to(self.device)
                                          ).last_hidden_state
        where = [(b, col, tok, req) for b, r in enumerate(rows) for req, cols, toks in r.targets
                 for col, tok in zip(cols, toks, strict=True)]
        token_lp: list[float] = []
        greedy: list[bool] = []
        for c in range(0, len(where), HEAD_CHUNK):  # at most [HEAD_CHUNK, V] logits at once
            part = where[c:c + HEAD_CHUNK]
            lp = head_logprobs(self.model, hidden[[w[0] for w in part], [w[1] for w in part]])
            tokens = torch.tensor([w[2] for w in part], device=lp.device)
            token_lp += lp.gather(-1, tokens[:, None])[:, 0].tolist()
            greedy += (lp.argmax(-1) == tokens).tolist()
        k = 0
        for r in rows:
            for req, cols, _ in r.targets:
                n = len(cols)
                results[req] = ContinuationScore(logprob=float(sum(token_lp[k:k + n])), num_tokens=n,
                                                 is_greedy=all(greedy[k:k + n]))
                k += n

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 batch_size: int = 8) -> list[str]:
        """Greedy continuations of `prompts`, each cut at the first stop string and at `max_new_tokens`.

        Generation of a sequence ends when it emits EOS or a stop string (HF `stop_strings`); the batch ends
        when all its sequences have. The token prefix all prompts share (a few-shot header) is run once and
        its KV cache copied into every batch (`_shared_prefix`). Returns the generated text only (no prompt),
        stop string excluded.
        """
        encoded = encode_prompts(self.tokenizer, prompts, max_length=self.max_length,
                                 max_new_tokens=max_new_tokens, where=self.path)
        prefix, prefix_cache = self._shared_prefix(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        kwargs: dict[str, Any] = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = self._left_pad([encoded[i][len(prefix):] for i in idx])
            if prefix_cache is not None:
                # [prefix][left padding][own tokens]: generate's position ids (cumulative mask) continue the
                # prefix's, the padding is masked out, and only the columns after the cache are computed.
                ids = torch.cat([torch.tensor([prefix] * len(idx), device=self.device), ids], dim=1)
                mask = torch.cat([torch.ones(len(idx), len(prefix), dtype=mask.dtype, device=self.device), mask], 1)
                kwargs["past_key_values"] = copy.deepcopy(prefix_cache)
                kwargs["past_key_values"].batch_repeat_interleave(len(idx))
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.pad_id, num_beams=1, **kwargs,
            )
            new = out[:, ids.shape[1]:]
            for b, i in enumerate(idx):
                outputs[i] = decode_completion(self.tokenizer, new[b].tolist(), stop)
        return outputs

    def _shared_prefix(self, encoded: list[list[int]]) -> tuple[list[int], DynamicCache | None]:
        """The token prefix every prompt starts with (each keeping at least one token of its own) and the
        batch-1 KV cache of the model on it; `([], None)` when there is none, a single prompt, or a model
        whose cache is not plain full attention in every layer (a sliding window or chunk would spend its
        slots on the padding between prefix and prompt; a linear-attention state would run through it)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if len(encoded) < 2 or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return [], None
        shared = 0
        limit = min(len(e) for e in encoded) - 1
        while shared < limit and all(e[shared] == encoded[0][shared] for e in encoded):
            shared += 1
        if shared == 0:
            return [], None
        prefix = encoded[0][:shared]
        # the trunk only: the cache is what is needed, not the prefix's [1, P, V] logits
        self.model.get_decoder()(input_ids=torch.tensor([prefix], device=self.device), past_key_values=cache,
                                 use_cache=True)
        return prefix, cache


@dataclass
class PackedContinuations:
    """One context followed by several continuations in one row. `ids`, `pos` (position ids: every
    continuation starts where the context ends) and `branch` (0: context, k + 1: continuation k) are `[L]`;
    `targets`: per continuation, (request index, columns whose hidden state predicts its tokens, tokens)."""

    ids: list[int]
    pos: list[int]
    branch: list[int]
    targets: list[tuple[int, list[int], list[int]]]


def pack_continuations(context: list[int], continuations: list[tuple[int, list[int]]]) -> PackedContinuations:
    """`context` then each `(request index, continuation ids)`; token j of a continuation is predicted from
    the column before it: the context's last column for j = 0, else its own token j − 1."""
    ids, pos, branch, targets = list(context), list(range(len(context))), [0] * len(context), []
    for k, (req, cont) in enumerate(continuations):
        first = len(ids)
        ids += cont
        pos += range(len(context), len(context) + len(cont))
        branch += [k + 1] * len(cont)
        targets.append((req, [len(context) - 1] + list(range(first, first + len(cont) - 1)), list(cont)))
    return PackedContinuations(ids, pos, branch, targets)


def _fit_rows(context: list[int], continuations: list[tuple[int, list[int]]], max_length: int
              ) -> list[PackedContinuations]:
    """One row for the context and all its continuations if it fits in `max_length` columns, else one row
    per continuation with the context cut from the left (at least one context token is kept)."""
    if len(context) + sum(len(c) for _, c in continuations) <= max_length:
        return [pack_continuations(context, continuations)]
    rows = []
    for req, cont in continuations:
        cont = cont[-(max_length - 1):]
        rows.append(pack_continuations(context[-(max_length - len(cont)):], [(req, cont)]))
    return rows


def continuation_mask(branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, L]` branch ids (0: context, k > 0: continuation k, −1: padding) → additive mask `[B, 1, L, L]`:
    query i sees key j ≤ i when j is context or in i's own continuation; padding sees only itself (a row
    with nothing to attend to would give NaN)."""
    length = branch.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = causal & same & (branch[:, None, :] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool) & (branch[:, :, None] < 0)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, max_length: int, max_new_tokens: int,
                   where: Path) -> list[list[int]]:
    """Prompt token ids (with the tokenizer's special tokens), each cut from the left so that prompt plus
    `max_new_tokens` fit in `max_length` positions. Every generation engine starts from these ids."""
    if not 0 < max_new_tokens < max_length:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be in (0, {max_length}) for {where}")
    return [tokenizer(p, add_special_tokens=True)["input_ids"][-(max_length - max_new_tokens):] for p in prompts]


def decode_completion(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> str:
    """Generated ids → text without special tokens (EOS, padding), cut at the first stop string."""
    return truncate_at_stop(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]
