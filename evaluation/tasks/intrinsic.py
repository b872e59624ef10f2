"""The intrinsic tasks: held-out perplexity per domain, KL(teacher‖student), top-1 agreement and the
speculative-decoding acceptance rate per domain (definitions in evaluation/intrinsic.py).

- `intrinsic`: in-distribution text, the run's `RUN/data/heldout.safetensors` (for `distill eval` on
  arbitrary folders, one built from the builtin corpora's held-out split, evaluation/heldout.py);
- `intrinsic_ood`: out-of-distribution text from sources never trained on (evaluation/ood.py); its metric
  names end in `_ood`, and the report's headline "% recovered" uses them.

The teacher's hidden states on a held-out file are computed once per (teacher, file, batch size) and kept
under `$DISTILL_CACHE/eval/teacher_hidden`, so each further student or checkpoint costs its own pass only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.artifacts import atomic_write_bytes, sha256_file, tokenizer_hash
from evaluation.cache import eval_cache_dir
from evaluation.intrinsic import intrinsic_sums, load_heldout, metrics_from_sums, units_from_sums
from evaluation.ood import ood_heldout
from evaluation.tasks import EvalContext, Task, TaskResult, register


@register
class Intrinsic(Task):
    name = "intrinsic"
    version = "2"
    suffix = ""
    needs_teacher = True

    def higher_is_better(self, metric: str) -> bool:
        return not (metric.startswith("ppl_") or metric.startswith("kl_to_teacher"))

    def heldout(self, ctx: EvalContext) -> Path:
        if ctx.heldout is None:
            raise ValueError("intrinsic: no held-out file given")
        return Path(ctx.heldout)

    def cache_key(self, ctx: EvalContext) -> dict[str, Any]:
        # limit does not apply: the held-out set is small and fixed; the teacher and the text decide the result.
        return {"task": self.name, "version": self.version, "teacher": ctx.teacher_hash,
                "heldout": sha256_file(self.heldout(ctx))[:16]}

    def run(self, model: Any, ctx: EvalContext) -> TaskResult:
        if ctx.teacher is None:
            raise ValueError(f"{self.name}: needs the teacher")
        student_tok, teacher_tok = tokenizer_hash(model.tokenizer), tokenizer_hash(ctx.teacher.tokenizer)
        if student_tok != teacher_tok:
            raise ValueError(f"{self.name}: {model.path} has tokenizer {student_tok}, the teacher {teacher_tok}; "
                             "token-level metrics need the same vocabulary")
        path = self.heldout(ctx)
        heldout = load_heldout(path)
        hidden_file = self._hidden_file(ctx)
        memo = ctx.teacher_hidden.setdefault(str(hidden_file), {})
        if not memo and hidden_file.is_file():
            memo.update(_load_hidden(hidden_file))
        known = len(memo)
        sums = intrinsic_sums(model.model, ctx.teacher.model, heldout, batch_size=ctx.batch_size,
                              teacher_hidden=memo)
        if len(memo) > known:
            _save_hidden(hidden_file, memo)
        return TaskResult(metrics=metrics_from_sums(sums, heldout.domains, self.suffix),
                          samples=int(sums.tokens.sum()), unit="tokens",
                          units=units_from_sums(sums, heldout.domains, self.suffix))

    def _hidden_file(self, ctx: EvalContext) -> Path:
        """Where the teacher's held-out hidden states are kept between runs: a new student then costs one
        student pass, not a teacher pass too."""

        key = self.cache_key(ctx)
        return eval_cache_dir() / "teacher_hidden" / f"{key['teacher']}-{key['heldout']}-b{ctx.batch_size}.safetensors"


@register
class IntrinsicOOD(Intrinsic):
    name = "intrinsic_ood"
    version = "1"
    suffix = "_ood"

    def heldout(self, ctx: EvalContext) -> Path:
        if ctx.teacher_path is None:
            raise ValueError("intrinsic_ood: needs the teacher's folder (for its tokenizer)")
        return ood_heldout(Path(ctx.teacher_path), documents=ctx.ood_documents, doc_tokens=ctx.ood_doc_tokens)


def _save_hidden(path: Path, hidden: dict[tuple[int, int], torch.Tensor]) -> None:
    from safetensors.torch import save


    atomic_write_bytes(path, save({f"{s}-{b}": t.contiguous().cpu() for (s, b), t in hidden.items()}))


def _load_hidden(path: Path) -> dict[tuple[int, int], torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name, tensor in load_file(str(path)).items():
        start, batch = name.split("-")
        out[(int(start), int(batch))] = tensor
    return out
