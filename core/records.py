"""Records and facts every stage shares, each defined once: the teacher's top-k target (`TopK`), a model's
vocabulary size and EOS ids, and the held-out rule of the data sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from core.config import InputError

# One document (or corpus item) in HELDOUT_EVERY is held out: by position in a user source (distill/data.py),
# by a hash of its key in a built-in corpus (distill/corpora.py, so a file's pieces stay together).
HELDOUT_EVERY = 20


class TopK(NamedTuple):
    """The teacher's top-k next-token distribution at some positions, leading shape `[*]`: one packed row
    `[L]` from a teacher backend or the logit store (position t predicts token t+1), or the `[N]` training
    positions of a batch.

    ids: int64 `[*, k]`, the top-k token ids, sorted by logprob descending.
    logprobs: float32 `[*, k]`, raw log-softmax values (nats, temperature 1).
    tail_logmass: float32 `[*]`, log(1 − Σ exp(logprobs)): the log of the mass outside the top-k.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor

    def select(self, index: torch.Tensor) -> TopK:
        """Entries `index` of a record with one leading dimension."""
        return TopK(self.ids[index], self.logprobs[index], self.tail_logmass[index])

    def flatten(self) -> TopK:
        """The record with its leading dimensions flattened to one: `[N, k]`, `[N]`."""
        k = self.ids.shape[-1]
        return TopK(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k), self.tail_logmass.reshape(-1))

    def to(self, device: torch.device | str) -> TopK:
        return TopK(*(t.to(device) for t in self))


def model_vocab_size(model_dir: Path) -> int:
    """`vocab_size` of an HF folder's config.json (top level, or its `text_config` for multimodal configs):
    the width of the logits, which may exceed len(tokenizer)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found — {model_dir} is not a Hugging Face model folder")
    config = json.loads(path.read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise InputError(f"{path}: no integer vocab_size (at top level or in text_config)")
    return vocab


def eos_ids_of(eos: Any, where: str) -> set[int]:
    """An `eos_token_id` setting (one id or a list) as a set of ids."""
    if eos is None:
        raise InputError(f"{where}: defines no EOS token (generation_config.json or tokenizer)")
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def eos_token_ids(model_dir: Path) -> set[int]:
    """The ids that end a generation: generation_config.json's eos_token_id, else the tokenizer's EOS."""
    gen_path = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    if eos is None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    return eos_ids_of(eos, str(model_dir))
