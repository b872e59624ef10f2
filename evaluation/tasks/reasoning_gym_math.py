"""Generative math at a small teacher's level: reasoning-gym problems, few-shot, greedy, exact answer.

GSM8K is out of reach of a 135M teacher (it scores 0), so it cannot show a gap. These families are easy
enough for it to score measurably, and none of them is a generator the builtin math corpus trains on
(distill/corpora.py). Items and shots come from the generator with fixed seeds (shots from another seed
than items); a completion is cut at the first newline and scored by the generator's own `score_answer`
(full credit only). The accuracy has a binomial standard error.
"""

from __future__ import annotations

import functools
from typing import Any

from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, accuracy, register

ITEM_SEED, SHOT_SEED = 2026, 7
NUM_SHOTS = 3
STOP = ("\n", "<|im_end|>", "</s>")
POOL = 2000  # items generated; `limit` takes a prefix (0: all of them)


@functools.cache
def _dataset(family: str, seed: int, size: int, config: tuple[tuple[str, Any], ...]) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(family, size=size, seed=seed, **dict(config))


class ReasoningGymTask(Task):
    """A reasoning-gym family as a benchmark: subclasses set `name`, `family`, `config`, `answer_tokens`."""

    family: str = ""
    config: tuple[tuple[str, Any], ...] = ()
    answer_tokens: int = 16  # generation budget: answers are one short line
    generates = True

    def prompt_prefix(self) -> str:
        shots = _dataset(self.family, SHOT_SEED, NUM_SHOTS, self.config)
        return "".join(f"Question: {it['question']}\nAnswer: {it['answer']}\n\n" for it in shots)

    def items(self, limit: int) -> list[dict[str, Any]]:
        data = _dataset(self.family, ITEM_SEED, POOL, self.config)
        n = len(data) if limit <= 0 else min(limit, len(data))
        return [data[i] for i in range(n)]

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        data = _dataset(self.family, ITEM_SEED, POOL, self.config)
        items = self.items(ctx.limit)
        prefix = self.prompt_prefix()
        outputs = model.generate([f"{prefix}Question: {it['question']}\nAnswer:" for it in items],
                                 max_new_tokens=min(ctx.max_new_tokens, self.answer_tokens), stop=STOP,
                                 batch_size=ctx.batch_size)
        details = [{"question": it["question"], "answer": str(it["answer"]), "output": out,
                    "correct": data.score_answer(out.strip(), it) == 1.0}
                   for it, out in zip(items, outputs, strict=True)]
        metrics, units = accuracy(f"{self.name}_acc", [d["correct"] for d in details])
        return TaskResult(metrics=metrics, samples=len(details), details=details, units=units)


@register
class SimpleEquations(ReasoningGymTask):
    """One-step linear equations with one-digit numbers ("Solve for x: 3*x + 4 = 19")."""

    name = "rg_simple_equations"
    version = "2"  # 2: 8 answer tokens (the answer is one integer)
    family = "simple_equations"
    config = (("min_terms", 2), ("max_terms", 2), ("min_value", 1), ("max_value", 9))
    answer_tokens = 8


@register
class TimeIntervals(ReasoningGymTask):
    """Durations between two clock times or dates."""

    name = "rg_time_intervals"
    family = "time_intervals"
    answer_tokens = 24


@register
class ComplexAddition(ReasoningGymTask):
    """Sums and differences of complex numbers with integer parts in [−9, 9]."""

    name = "rg_complex_addition"
    family = "complex_arithmetic"
    config = (("operations", ("+", "-")), ("operations_weights", (0.5, 0.5)), ("min_real", -9), ("max_real", 9),
              ("min_imag", -9), ("max_imag", 9))
    answer_tokens = 24
