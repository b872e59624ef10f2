"""The on-policy gap: reverse KL(student ‖ teacher) per token on the student's own samples, and the accuracy
of its greedy answers, on held-out arithmetic prompts.

Items: `ctx.limit` problems of reasoning-gym's `basic_arithmetic` (two 1-digit terms, + and −: the 135M
teacher fails most 2-digit ones), generated with `HELDOUT_SEED`, posed through the chat template exactly
as `train.prompts` poses them to an on-policy run (synth_data.prompts: the user turn with the math
instruction, ending with the assistant header). The family has only 200 distinct problems, so
configs/on_policy.yaml trains on another one (2-digit terms): no held-out problem is a training prompt.

Metrics:
- `kl_to_teacher_on_policy` (nats/token, ↓): the model samples one completion per prompt at temperature 1 (seeded,
  at most `MAX_NEW_TOKENS` tokens); at every position predicting a completion token both models give their
  full-vocabulary next-token distributions q (model) and p (teacher); the metric is Σ KL(q ‖ p) over those
  positions / their number — the quantity on-policy distillation minimises, measured where the model
  actually goes. 0 for the teacher itself.
- `arith_acc` (↑): share of greedy completions whose final answer (synth_data.verifiers) is right; the
  embedded SmolLM2-135M-Instruct teacher scores well above 0 on this family, so a student's gain shows.
"""

from __future__ import annotations

from typing import Any

from evaluation.tasks import EvalContext, Task, TaskResult, register

FAMILY = ("reasoning-gym:basic_arithmetic?max_terms=2&min_terms=2&max_digits=1&min_digits=1"
          "&allow_negation=false&allow_parentheses=false&operators=+,-")
HELDOUT_SEED = 7_000_003
MAX_NEW_TOKENS = 96
SAMPLE_SEED = 0


def heldout_prompts(limit: int) -> list[Any]:
    """The held-out `PromptTask`s (limit 0: 200 of them)."""
    from synth_data.prompts import load_prompts

    return load_prompts([FAMILY], limit or 200, HELDOUT_SEED)


def _eos_ids(model: Any) -> set[int]:
    eos = model.model.generation_config.eos_token_id
    eos = model.tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, list) else {int(eos)}


@register
class OnPolicy(Task):
    name = "on_policy"
    version = "2"
    needs_teacher = True  # the suite hands it the loaded teacher (EvalContext.teacher)

    def higher_is_better(self, metric: str) -> bool:
        return metric != "kl_to_teacher_on_policy"

    def cache_key(self, ctx: EvalContext) -> dict[str, Any]:
        return {**super().cache_key(ctx), "teacher": ctx.teacher_hash, "batch_size": ctx.batch_size}

    def run(self, model: Any, ctx: EvalContext) -> TaskResult:
        from distill.artifacts import tokenizer_hash
        from distill.on_policy import reverse_kl_on_samples, sample_completions
        from synth_data.prompts import encode_prompt
        from synth_data.verifiers import answers_match, extract_answer

        if ctx.teacher is None:
            raise ValueError("on_policy: needs the teacher (EvalContext.teacher)")
        if tokenizer_hash(model.tokenizer) != tokenizer_hash(ctx.teacher.tokenizer):
            raise ValueError(f"on_policy: {model.path} and the teacher use different tokenizers; reverse KL per "
                             "token needs the same vocabulary")
        tasks = heldout_prompts(ctx.limit)
        prompts = [encode_prompt(t, model.tokenizer) for t in tasks]
        eos_ids, batch = _eos_ids(model), ctx.batch_size
        common = {"top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "pad_id": model.pad_id, "eos_ids": eos_ids}
        greedy, sampled = [], []
        for start in range(0, len(prompts), batch):
            group = prompts[start:start + batch]
            greedy += sample_completions(model.model, group, temperature=0.0, seed=0, **common)
            if model is not ctx.teacher:
                sampled += sample_completions(model.model, group, temperature=1.0, seed=SAMPLE_SEED + start,
                                              **common)
        rkl, positions = 0.0, sum(len(c) for c in greedy)
        if model is not ctx.teacher:
            total, positions = reverse_kl_on_samples(model.model, ctx.teacher.model, prompts, sampled,
                                                     model.pad_id, batch)
            rkl = total / positions
        details = []
        for task, completion in zip(tasks, greedy, strict=True):
            text = model.tokenizer.decode(completion, skip_special_tokens=True)
            correct = answers_match(extract_answer(text), task.reference["answer"])
            details.append({"id": task.id, "answer": task.reference["answer"], "output": text, "correct": correct})
        accuracy = sum(d["correct"] for d in details) / len(details)
        return TaskResult(metrics={"kl_to_teacher_on_policy": rkl, "arith_acc": accuracy}, samples=len(details),
                          details=details)
