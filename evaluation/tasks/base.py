"""What a benchmark task is, and what it may ask of a model.

A task turns a model into metrics. It sees the model only through `LanguageModel` — batched greedy
`generate` and batched continuation `score` (implemented by `evaluation.lm.EvalModel`; a task with
`generates = True` only generates, and may be handed `evaluation.vllm_lm.VLLMEvalModel` instead) — so each
task is a small class: its items, its prompt, its scoring rule, and which way its metrics point.
"""

from __future__ import annotations

import dataclasses
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
    """Settings shared by all tasks of one evaluation. `teacher` (an EvalModel), `teacher_hash`,
    `teacher_path`, `heldout` (a path to `heldout.safetensors`), `ood_*` and `teacher_hidden` are used by the
    intrinsic tasks only."""

    limit: int = 20
    batch_size: int = 8
    max_new_tokens: int = 256
    generation_engine: str = "transformers"  # or "vllm-<dtype>": what `generate` runs on (see evaluation/suite.py)
    teacher: Any = None
    teacher_hash: str = ""
    teacher_path: Path | None = None  # intrinsic_ood: the tokenizer its held-out set is built with
    heldout: Path | None = None
    ood_documents: int = 32  # intrinsic_ood: documents per domain
    ood_doc_tokens: int = 128  # intrinsic_ood: tokens per document (the rest is cut)
    # intrinsic: per held-out cache file, the teacher's hidden states, reused for every student and checkpoint
    teacher_hidden: dict = field(default_factory=dict)
    task_limits: dict[str, int] = field(default_factory=dict)  # task name → its own `limit`

    def for_task(self, name: str) -> EvalContext:
        """This context with the task's own item limit (the teacher, memo and other settings shared)."""
        return dataclasses.replace(self, limit=self.task_limits.get(name, self.limit))


@dataclass
class TaskResult:
    """`metrics`: metric name → value; `samples`: items (or tokens, see `unit`) processed, for samples/s;
    `details`: one record per item (prediction, reference, correctness) for inspection."""

    metrics: dict[str, float]
    samples: int
    unit: str = "items"
    details: list[dict[str, Any]] = field(default_factory=list)
    # metric → per-unit sums (evaluation/stats.py `Units` JSON), for standard errors and paired intervals
    units: dict[str, dict[str, Any]] = field(default_factory=dict)


def accuracy(metric: str, correct: Sequence[bool]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """`{metric: share correct}` and its per-item units (binomial standard error)."""
    if not correct:
        raise ValueError(f"{metric}: no items were scored")
    return ({metric: sum(map(bool, correct)) / len(correct)},
            {metric: {"num": [float(bool(c)) for c in correct], "den": None, "transform": "mean", "binomial": True}})


class TaskSkipped(Exception):
    """Raised by a task that does not apply (the message says why): reported as skipped, not as failed."""


class Task:
    """Base class. Subclasses set `name`, `version` (bump it when prompts or scoring change: it is part of
    the result cache key) and implement `run`."""

    name: str = ""
    version: str = "1"
    generates: bool = False  # calls `generate` only, never `score`; results depend on max_new_tokens and engine
    needs_teacher: bool = False  # reads `ctx.teacher` (the teacher loaded in transformers)

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        raise NotImplementedError

    def higher_is_better(self, metric: str) -> bool:
        return True

    def cache_key(self, ctx: EvalContext) -> dict[str, Any]:
        """What besides the model decides this task's result."""
        key: dict[str, Any] = {"task": self.name, "version": self.version, "limit": ctx.limit}
        if self.generates:
            key["max_new_tokens"] = ctx.max_new_tokens
            if ctx.generation_engine != "transformers":  # absent for transformers: older entries stay valid
                key["engine"] = ctx.generation_engine
        return key
