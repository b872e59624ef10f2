"""The intrinsic task: held-out perplexity per domain, KL(teacher‖student) and top-1 agreement.

See evaluation/intrinsic.py for the definitions. The held-out text is shared: the run's
`RUN/data/heldout.safetensors`, or for `distill eval` on arbitrary folders one built from the builtin
corpora with the teacher's tokenizer (evaluation/heldout.py).
"""

from __future__ import annotations

from typing import Any

from distill.artifacts import sha256_file, tokenizer_hash
from evaluation.intrinsic import intrinsic_metrics, load_heldout
from evaluation.tasks import EvalContext, Task, TaskResult, register


@register
class Intrinsic(Task):
    name = "intrinsic"
    version = "1"

    def higher_is_better(self, metric: str) -> bool:
        return not (metric.startswith("ppl_") or metric == "kl_to_teacher")

    def cache_key(self, ctx: EvalContext) -> dict[str, Any]:
        # limit does not apply: the held-out set is small and fixed; the teacher and the text decide the result.
        if ctx.heldout is None:
            raise ValueError("intrinsic: no held-out file given")
        return {"task": self.name, "version": self.version, "teacher": ctx.teacher_hash,
                "heldout": sha256_file(ctx.heldout)[:16]}

    def run(self, model: Any, ctx: EvalContext) -> TaskResult:
        if ctx.teacher is None or ctx.heldout is None:
            raise ValueError("intrinsic: needs the teacher and a held-out file")
        student_tok, teacher_tok = tokenizer_hash(model.tokenizer), tokenizer_hash(ctx.teacher.tokenizer)
        if student_tok != teacher_tok:
            raise ValueError(f"intrinsic: {model.path} has tokenizer {student_tok}, the teacher {teacher_tok}; "
                             "token-level metrics need the same vocabulary")
        heldout = load_heldout(ctx.heldout)
        teacher = model.model if model is ctx.teacher else ctx.teacher.model
        metrics, tokens = intrinsic_metrics(model.model, teacher, heldout, batch_size=ctx.batch_size,
                                            teacher_hidden=ctx.teacher_hidden)
        return TaskResult(metrics=metrics, samples=tokens, unit="tokens")
