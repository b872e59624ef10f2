"""Intrinsic metrics on shared held-out text: perplexity per domain, KL(teacher‖student), top-1 agreement.

The held-out set is the packed format of `RUN/data/heldout.safetensors` (docs/ARCHITECTURE.md): rows of
several documents whose `position_ids` restart at 0 per document. Both models run with the document-causal
mask of `distill.packing`, so no token sees another document. A token at column j counts as a target when
`loss_mask[j] == 1` and it is not a document's first token (`position_ids[j] != 0`: it would be predicted
from the previous document); it is predicted from the hidden state at column j − 1.

Memory: each model's trunk gives `[B, L, H]` hidden states; the vocabulary projection runs on `chunk_size`
target positions at a time, so at most two `[chunk_size, V]` fp32 logit blocks exist at once — never a full
`[B, L, V]` tensor for either model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.packing import document_causal_mask


@dataclass
class HeldOut:
    """Packed held-out rows: `input_ids`/`position_ids` long `[N, L]`, `loss_mask` bool `[N, L]`,
    `domain` long `[N]` indexing `domains`."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    domain: torch.Tensor
    domains: list[str]


def load_heldout(path: Path) -> HeldOut:
    """Read a `heldout.safetensors` file; domain names come from the `manifest.json` next to it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out file not found (run the data stage first)")
    tensors = load_file(str(path))
    for key in ("input_ids", "position_ids", "loss_mask", "domain"):
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor {key!r} (found {sorted(tensors)})")
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing — needed for the held-out domain names")
    domains = json.loads(manifest.read_text()).get("domains")
    if not domains:
        raise ValueError(f"{manifest}: no 'domains' list")
    return HeldOut(
        input_ids=tensors["input_ids"].long(), position_ids=tensors["position_ids"].long(),
        loss_mask=tensors["loss_mask"].bool(), domain=tensors["domain"].long(), domains=list(domains),
    )


# ---------------------------------------------------------------------------------------------------------


def _hidden(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states `[B, L, H]` of a HF causal LM on packed rows."""
    trunk = model.get_decoder()
    mask = document_causal_mask(pos, dtype=model.dtype)
    return trunk(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state


def _logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """`[n, H]` hidden states → `[n, V]` fp32 log-probabilities (with the model's logit soft-capping, if any)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@dataclass
class _Targets:
    """Target positions of one batch, flattened: hidden-state row indices and the tokens they predict."""

    rows: torch.Tensor  # long [n]: index into hidden[:, :-1].reshape(-1, H)
    tokens: torch.Tensor  # long [n]
    domains: torch.Tensor  # long [n]


def _targets(ids: torch.Tensor, pos: torch.Tensor, loss_mask: torch.Tensor, domain: torch.Tensor) -> _Targets:
    valid = loss_mask[:, 1:] & (pos[:, 1:] != 0)  # [B, L-1]: column j+1 is a target predicted from column j
    rows = valid.reshape(-1).nonzero()[:, 0]
    tokens = ids[:, 1:].reshape(-1)[rows]
    domains = domain[:, None].expand_as(valid).reshape(-1)[rows]
    return _Targets(rows, tokens, domains)


@torch.inference_mode()
def intrinsic_metrics(student, teacher, heldout: HeldOut, *, batch_size: int = 8, chunk_size: int = 512,
                      teacher_hidden: dict[tuple[int, int], torch.Tensor] | None = None) -> tuple[dict[str, float], int]:
    """Metrics of `student` (a HF causal LM) on `heldout`, against `teacher` (another, or the same object).

    Returns `ppl_<domain>` for every domain present, `ppl_all`, `kl_to_teacher` (mean over target tokens
    of KL(p_teacher ‖ p_student) in nats) and `top1_agreement` (share of target tokens where both models'
    argmax agree), and the number of target tokens. When `student is teacher` the teacher's logits are
    reused, so KL is exactly 0 and agreement exactly 1. `teacher_hidden`, if given, memoises the teacher's
    hidden states per batch (keyed by first row and batch size) so several students are compared for one teacher pass.
    """
    num_domains = len(heldout.domains)
    nll = torch.zeros(num_domains, dtype=torch.float64)
    count = torch.zeros(num_domains, dtype=torch.float64)
    kl_sum = 0.0
    agree = 0
    device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    for start in range(0, heldout.input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        ids, pos = heldout.input_ids[sl], heldout.position_ids[sl]
        tg = _targets(ids, pos, heldout.loss_mask[sl], heldout.domain[sl])
        h_s = _hidden(student, ids.to(device), pos.to(device))
        h_s = h_s[:, :-1].reshape(-1, h_s.shape[-1])
        if teacher is student:
            h_t = h_s
        elif teacher_hidden is not None and (start, batch_size) in teacher_hidden:
            h_t = teacher_hidden[(start, batch_size)].to(t_device)
        else:
            h_t = _hidden(teacher, ids.to(t_device), pos.to(t_device))
            h_t = h_t[:, :-1].reshape(-1, h_t.shape[-1])
            if teacher_hidden is not None:
                teacher_hidden[(start, batch_size)] = h_t
        for c in range(0, tg.rows.numel(), chunk_size):
            rows = tg.rows[c:c + chunk_size]
            tokens = tg.tokens[c:c + chunk_size].to(device)
            lp_s = _logprobs(student, h_s[rows.to(device)])  # [n, V]
            lp_t = lp_s if teacher is student else _logprobs(teacher, h_t[rows.to(t_device)]).to(device)
            if lp_s.shape[-1] != lp_t.shape[-1]:
                raise ValueError(f"vocab sizes differ: student {lp_s.shape[-1]}, teacher {lp_t.shape[-1]}")
            token_nll = -lp_s.gather(-1, tokens[:, None])[:, 0].double().cpu()
            nll.index_add_(0, tg.domains[c:c + chunk_size], token_nll)
            count.index_add_(0, tg.domains[c:c + chunk_size], torch.ones_like(token_nll))
            if teacher is not student:
                # KL(T‖S) = Σ_v p_T(v) (log p_T(v) − log p_S(v)); exactly 0 when the two rows are equal.
                kl_sum += float((lp_t.exp() * (lp_t - lp_s)).sum(-1).double().sum())
                agree += int((lp_t.argmax(-1) == lp_s.argmax(-1)).sum())
            else:
                agree += rows.numel()
    total = float(count.sum())
    if total == 0:
        raise ValueError("held-out set has no target tokens (loss_mask is all zero)")
    metrics = {f"ppl_{d}": math.exp(float(nll[i] / count[i])) for i, d in enumerate(heldout.domains) if count[i] > 0}
    metrics["ppl_all"] = math.exp(float(nll.sum()) / total)
    metrics["kl_to_teacher"] = kl_sum / total
    metrics["top1_agreement"] = agree / total
    return metrics, int(total)
