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

from collections.abc import Sequence
from typing import Any

import torch

from core.artifacts import tokenizer_hash
from core.packing import document_causal_mask
from core.records import eos_ids_of
from core.sampling import completion_rows, sample_completions
from evaluation.tasks import EvalContext, Task, TaskResult, register
from synth_data.prompts import encode_prompt, load_prompts
from synth_data.verifiers import answers_match, extract_answer

FAMILY = ("reasoning-gym:basic_arithmetic?max_terms=2&min_terms=2&max_digits=1&min_digits=1"
          "&allow_negation=false&allow_parentheses=false&operators=+,-")
HELDOUT_SEED = 7_000_003
MAX_NEW_TOKENS = 96
SAMPLE_SEED = 0


def heldout_prompts(limit: int) -> list[Any]:
    """The held-out `PromptTask`s (limit 0: 200 of them)."""
    return load_prompts([FAMILY], limit or 200, HELDOUT_SEED)


def _eos_ids(model: Any) -> set[int]:
    eos = model.model.generation_config.eos_token_id
    return eos_ids_of(model.tokenizer.eos_token_id if eos is None else eos, str(model.path))


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


@torch.no_grad()
def reverse_kl_on_samples(student: torch.nn.Module, teacher: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          completions: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
                          ) -> tuple[float, int]:
    """Σ over completion positions of KL(q_t ‖ p_t) = Σ_v q_t(v) (log q_t(v) − log p_t(v)) over the full
    vocabulary (float32 log-softmax), q the student, p the teacher, at every position predicting a completion
    token; returns (sum in nats, number of positions). Both models see the same rows (`completion_rows`)."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        ids, pos, select, _ = completion_rows(prompts[start:start + batch_size],
                                              completions[start:start + batch_size], pad_id)
        logq = _selected_logprobs(student, ids, pos, select)
        logp = _selected_logprobs(teacher, ids, pos, select)
        total += float((logq.exp() * (logq - logp)).sum())
        count += int(select.numel())
    return total, count


def _selected_logprobs(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor,
                       select: torch.Tensor) -> torch.Tensor:
    """log-softmax `[N, V]` (float32) of `model` at the flat positions `select` of rows `ids` `[B, L]`."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    mask = document_causal_mask(pos.to(device), dtype=dtype)
    hidden = model.get_decoder()(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask,
                                 use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[select.to(device)]
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
