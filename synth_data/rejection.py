"""Rejection sampling: score every sampled answer of a prompt, then keep the best (or all) passing ones.

A sample is first checked for length (cut off at `max_new_tokens`, or shorter than the minimum); a sample
that survives is verified by its domain's verifier (math answer match, code tests in the sandbox) or, for
domains without one, scored by the reward model when one is configured. Verdicts:
`pass`/`fail` (verifier), `reward_model` (scored, always eligible), `unverified` (no verifier, no reward
model: eligible with score 0), `truncated`, `too_short` (never eligible).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from synth_data.prompts import PromptTask
from synth_data.verifiers import VERIFIERS

SANDBOX_WORKERS = 2  # concurrent sandboxed test runs (each is a separate process)


def score_prompt(task: PromptTask, record: dict[str, Any], *, reward_model: Any = None, min_tokens: int = 1,
                 drop_truncated: bool = True, code_timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Score the completions of one generation-log `record` for `task`.

    Returns one dict per completion: `text`, `num_tokens`, `truncated`, `score` (float; verifier score in
    [0, 1] or the raw reward), `passed` (eligible for selection), `verdict`, `detail`.
    """
    samples = []
    for text, ntok, trunc in zip(record["completions"], record["num_tokens"], record["truncated"], strict=True):
        verdict = "truncated" if trunc and drop_truncated else "too_short" if ntok < min_tokens else ""
        samples.append({"text": text, "num_tokens": ntok, "truncated": trunc, "score": 0.0, "passed": False,
                        "verdict": verdict, "detail": ""})
    todo = [s for s in samples if not s["verdict"]]
    verifier = VERIFIERS.get(task.domain)
    if verifier is not None:
        reference = {**task.reference, "timeout_s": code_timeout_s}
        with ThreadPoolExecutor(max_workers=SANDBOX_WORKERS) as pool:
            verdicts = list(pool.map(lambda s: verifier(s["text"], reference), todo))
        for s, v in zip(todo, verdicts, strict=True):
            s.update(score=v.score, passed=v.passed, verdict="pass" if v.passed else "fail", detail=v.detail)
    elif reward_model is not None:
        rewards = reward_model.score([[{"role": "user", "content": task.prompt},
                                       {"role": "assistant", "content": s["text"]}] for s in todo])
        for s, r in zip(todo, rewards, strict=True):
            s.update(score=r, passed=True, verdict="reward_model", detail=f"reward {r:.4f} ({reward_model.name})")
    else:
        for s in todo:
            s.update(passed=True, verdict="unverified", detail="no verifier or reward model for this domain")
    return samples


def select(samples: list[dict[str, Any]], keep: Literal["best", "all_passing"]) -> list[int]:
    """Indices of the samples to keep: the highest-scoring passing one (first on ties) or every passing one."""
    passing = [i for i, s in enumerate(samples) if s["passed"]]
    if keep == "all_passing" or not passing:
        return passing
    best = max(passing, key=lambda i: (samples[i]["score"], -i))
    return [best]
