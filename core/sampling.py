"""Reproducible sampling from any causal LM (a student or a teacher in transformers), and the rows that put a
prompt and its completion together for scoring: shared by on-policy training (distill/on_policy.py) and the
on-policy gap metric (evaluation/tasks/on_policy.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, temperature: float,
                       top_p: float, max_new_tokens: int, seed: int, pad_id: int, eos_ids: set[int]) -> list[list[int]]:
    """One completion per prompt sampled from `model` itself (no top-k, no repetition penalty: exactly the
    model's distribution at `temperature`, cut to `top_p`; temperature 0 decodes greedily), prompts
    left-padded into one batch, the global RNG seeded with `seed` and restored afterwards. Each completion
    ends with the first EOS it emitted, or at `max_new_tokens`."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    # Set explicitly: generate fills unset fields from the model folder's generation_config.json.
    config = GenerationConfig(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    model.train(was_training)
    return [keep_through_eos(row, eos_ids) for row in out[:, width:].tolist()]


def keep_through_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (the rest is padding)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return list(tokens[:i + 1])
    return list(tokens)


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion pairs → `input_ids`, `position_ids` int64 `[B, L]` (right padding, which restarts
    the positions at 0: a document of its own), `select` int64 `[N]` (flat indices of the positions whose
    next token is a completion token) and `labels` int64 `[N]` (those tokens)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((len(prompts), length), dtype=torch.int64)
    select, labels = [], []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not completion:
            raise ValueError(f"on-policy row {row}: empty completion (train.max_new_tokens must be > 0)")
        sequence = list(prompt) + list(completion)
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        position_ids[row, :len(sequence)] = torch.arange(len(sequence))
        position_ids[row, len(sequence):] = torch.arange(length - len(sequence))
        select += [row * length + t for t in range(len(prompt) - 1, len(sequence) - 1)]
        labels += list(completion)
    return input_ids, position_ids, torch.tensor(select, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)
