"""What a benchmark task is, and what it may ask of a model.

A task turns a model into metrics. It sees the model only through `LanguageModel` — batched greedy
`generate` and batched continuation `score` (implemented by `evaluation.lm.EvalModel`) — so each task is
a small class: its items, its prompt, its scoring rule, and which way its metrics point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evaluation.lm import ContinuationScore


class LanguageModel(Protocol):
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 batch_size: int = 8) -> list[str]: ...

    def score(self, requests: Sequence[tuple[str, str]], batch_size: int = 8) -> list[ContinuationScore]: ...


@dataclass
class EvalContext:
    """Settings shared by all tasks of one evaluation. `teacher` (an EvalModel), `teacher_hash`, `heldout`
    (a path to `heldout.safetensors`) and `teacher_hidden` are used by the intrinsic task only."""

    limit: int = 20
    batch_size: int = 8
    max_new_tokens: int = 256
    teacher: Any = None
    teacher_hash: str = ""
    heldout: Path | None = None
    teacher_hidden: dict = field(default_factory=dict)  # intrinsic: teacher hidden states, reused per student


@dataclass
class TaskResult:
    """`metrics`: metric name → value; `samples`: items (or tokens, see `unit`) processed, for samples/s;
    `details`: one record per item (prediction, reference, correctness) for inspection."""

    metrics: dict[str, float]
    samples: int
    unit: str = "items"
    details: list[dict[str, Any]] = field(default_factory=list)


class Task:
    """Base class. Subclasses set `name`, `version` (bump it when prompts or scoring change: it is part of
    the result cache key) and implement `run`."""

    name: str = ""
    version: str = "1"
    generates: bool = False  # results depend on max_new_tokens

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        raise NotImplementedError

    def higher_is_better(self, metric: str) -> bool:
        return True

    def cache_key(self, ctx: EvalContext) -> dict[str, Any]:
        """What besides the model decides this task's result."""
        key: dict[str, Any] = {"task": self.name, "version": self.version, "limit": ctx.limit}
        if self.generates:
            key["max_new_tokens"] = ctx.max_new_tokens
        return key
