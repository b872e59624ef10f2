"""The intrinsic task: held-out perplexity per domain, KL(teacher‖student) and top-1 agreement.

See evaluation/intrinsic.py for the definitions. The held-out text is shared: the run's
`RUN/data/heldout.safetensors`, or for `distill eval` on arbitrary folders one built from the builtin
corpora with the teacher's tokenizer (evaluation/heldout.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
        if model is ctx.teacher:
            metrics, tokens = intrinsic_metrics(model.model, model.model, heldout, batch_size=ctx.batch_size)
            return TaskResult(metrics=metrics, samples=tokens, unit="tokens")
        hidden_file = self._hidden_file(ctx)
        if not ctx.teacher_hidden and hidden_file.is_file():
            ctx.teacher_hidden.update(_load_hidden(hidden_file))
        known = len(ctx.teacher_hidden)
        metrics, tokens = intrinsic_metrics(model.model, ctx.teacher.model, heldout, batch_size=ctx.batch_size,
                                            teacher_hidden=ctx.teacher_hidden)
        if len(ctx.teacher_hidden) > known:
            _save_hidden(hidden_file, ctx.teacher_hidden)
        return TaskResult(metrics=metrics, samples=tokens, unit="tokens")

    def _hidden_file(self, ctx: EvalContext) -> Path:
        """Where the teacher's held-out hidden states are kept between runs (~14 MB for the quickstart): a
        new student then costs one student pass, not a teacher pass too."""
        from evaluation.cache import eval_cache_dir

        key = self.cache_key(ctx)
        return eval_cache_dir() / "teacher_hidden" / f"{key['teacher']}-{key['heldout']}-b{ctx.batch_size}.safetensors"


def _save_hidden(path: Path, hidden: dict[tuple[int, int], torch.Tensor]) -> None:
    from safetensors.torch import save

    from distill.artifacts import atomic_write_bytes

    atomic_write_bytes(path, save({f"{s}-{b}": t.contiguous().cpu() for (s, b), t in hidden.items()}))


def _load_hidden(path: Path) -> dict[tuple[int, int], torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name, tensor in load_file(str(path)).items():
        start, batch = name.split("-")
        out[(int(start), int(batch))] = tensor
    return out
