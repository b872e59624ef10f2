"""Reward-model scoring for prompts without a verifier (open-ended instructions).

Any `AutoModelForSequenceClassification` with one output label works as a reward model: the conversation
(prompt + candidate answer) is rendered with the reward model's own chat template (or "role: content"
lines when it has none) and the scalar logit at the last token is the score (higher is better).
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import InputError
from teachers.resolve import pick_device


class RewardModel:
    """A sequence-classification reward model; `score(conversations)` → one float per conversation."""

    def __init__(self, model: str, device: str = "auto", max_length: int = 2048):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise InputError(f"synth.reward_model: {model} has num_labels={self.model.config.num_labels}; a reward "
                             "model must output one scalar (num_labels=1)")
        self.model = self.model.to(pick_device(device)).eval()
        self.device = next(self.model.parameters()).device
        self.max_length = max_length
        self.name = model

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.inference_mode()
    def score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        """One reward per conversation. Conversations run one at a time (no padding), so the pooled token
        is always the true last token, whatever the model's pad-token convention; texts longer than
        `max_length` tokens keep their end (the answer)."""
        scores = []
        for messages in conversations:
            ids = self.tokenizer(self._render(messages), add_special_tokens=False)["input_ids"][-self.max_length:]
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
            scores.append(float(logits[0, 0]))
        return scores

    def close(self) -> None:
        self.model = None
