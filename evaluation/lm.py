"""A causal LM under evaluation: batched continuation scoring and batched greedy generation.

Works on any Hugging Face causal-LM folder. Both operations pad on the LEFT and pass explicit
`position_ids` (cumulative sum of the attention mask), so every sequence sees the same positions it would
see alone; with left padding every continuation ends at the last column, which lets scoring ask the model
for the logits of the last K positions only (`logits_to_keep`) instead of a full `[B, L, V]` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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
        from teachers.resolve import load_model, load_tokenizer

        self.path = Path(path)
        self.model = load_model(self.path, dtype=dtype, device=device)
        self.device = next(self.model.parameters()).device
        if self.model.config._attn_implementation == "sdpa" and self.device.type == "cpu":
            from evaluation.attention import register

            # Same outputs as "sdpa" without copying the KV cache per query head (see evaluation/attention.py).
            self.model.set_attn_implementation(register())
        has_tokenizer = (self.path / "tokenizer.json").is_file() or (self.path / "tokenizer_config.json").is_file()
        if not has_tokenizer and tokenizer_path is None:
            raise FileNotFoundError(f"{self.path}: no tokenizer files and no tokenizer_path given")
        self.tokenizer = load_tokenizer(self.path if has_tokenizer else Path(tokenizer_path))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    # ------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of ids → `input_ids`, `attention_mask`, `position_ids`, each `[B, max_len]`, padded on the left."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[str, str]], batch_size: int = 8) -> list[ContinuationScore]:
        """Log P(continuation | context) for each `(context, continuation)` pair.

        Context and continuation are tokenized separately and concatenated (the split point is then exact);
        an over-long context is cut from the left. Requests are processed longest first so a batch holds
        similar lengths.
        """
        encoded = []
        for context, continuation in requests:
            cont = self.encode(continuation, special=False)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-80:]!r}")
            ctx = self.encode(context)
            full = (ctx + cont)[-self.max_length:]
            encoded.append((full, len(cont)))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        results: list[ContinuationScore | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i][0] for i in idx]
            ids, mask, pos = self._left_pad(rows)
            keep = max(encoded[i][1] for i in idx) + 1
            # logits[:, j] predicts token at column width - keep + j + 1; the last column predicts nothing.
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, keep-1, V]
            targets = ids[:, -(keep - 1):]
            token_lp = logprobs.gather(-1, targets[..., None])[..., 0]  # [B, keep-1]
            greedy = logprobs.argmax(-1) == targets
            for b, i in enumerate(idx):
                n = encoded[i][1]
                results[i] = ContinuationScore(
                    logprob=float(token_lp[b, -n:].sum()), num_tokens=n, is_greedy=bool(greedy[b, -n:].all())
                )
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 batch_size: int = 8) -> list[str]:
        """Greedy continuations of `prompts`, each cut at the first stop string and at `max_new_tokens`.

        Generation of a sequence ends when it emits EOS or a stop string (HF `stop_strings`); the batch ends
        when all its sequences have. Returns the generated text only (no prompt), stop string excluded.
        """
        if not 0 < max_new_tokens < self.max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be in (0, {self.max_length}) for {self.path}")
        encoded = [self.encode(p)[-(self.max_length - max_new_tokens):] for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, _ = self._left_pad([encoded[i] for i in idx])
            kwargs: dict[str, Any] = {}
            if stop:
                kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.pad_id, num_beams=1, **kwargs,
            )
            new = out[:, ids.shape[1]:]
            for b, i in enumerate(idx):
                outputs[i] = truncate_at_stop(self.tokenizer.decode(new[b], skip_special_tokens=True), stop)
        return outputs


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]
