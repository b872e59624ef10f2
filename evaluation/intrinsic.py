"""Intrinsic metrics on shared held-out text: perplexity per domain, KL(teacher‖student), top-1 agreement,
and the speculative-decoding acceptance rate α per domain.

The held-out set is the packed format of `RUN/data/heldout.safetensors` (docs/ARCHITECTURE.md): rows of
several documents whose `position_ids` restart at 0 per document. Both models run with the document-causal
mask of `core.packing`, so no token sees another document. A token at column j counts as a target when
`loss_mask[j] == 1` and it is not a document's first token (`position_ids[j] != 0`: it would be predicted
from the previous document); it is predicted from the hidden state at column j − 1.

Acceptance (Leviathan et al., 2023): with the student drafting and the teacher verifying, a drafted token
is accepted with probability β(x) = Σ_v min(p_T(v|x), p_S(v|x)) at context x; α is its mean over target
positions, and a draft of γ tokens then yields (1 − α^{γ+1}) / (1 − α) tokens per teacher forward (eq. 1).

Everything is also returned per unit (a document piece: a run of a row's columns between position-id
restarts), the independent units evaluation/stats.py bootstraps over.

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

from core.packed import read_packed_file
from core.packing import document_causal_mask, training_positions


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
    path = Path(path)
    arrays = {name: torch.from_numpy(a.astype("int64")) for name, a in read_packed_file(path).items()}
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing — needed for the held-out domain names")
    domains = json.loads(manifest.read_text()).get("domains")
    if not domains:
        raise ValueError(f"{manifest}: no 'domains' list")
    return HeldOut(input_ids=arrays["input_ids"], position_ids=arrays["position_ids"],
                   loss_mask=arrays["loss_mask"].bool(), domain=arrays["domain"], domains=list(domains))


# ---------------------------------------------------------------------------------------------------------


def _hidden(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states `[B, L, H]` of a HF causal LM on packed rows."""
    trunk = model.get_decoder()
    mask = document_causal_mask(pos, dtype=model.dtype)
    return trunk(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state


def head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """`[n, H]` hidden states → `[n, V]` fp32 log-probabilities (with the model's logit soft-capping, if any)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@dataclass
class _Targets:
    """Target positions of one batch, flattened: hidden-state row indices, the tokens they predict and the
    held-out unit (document piece) each belongs to."""

    rows: torch.Tensor  # long [n]: index into hidden[:, :-1].reshape(-1, H)
    tokens: torch.Tensor  # long [n]
    units: torch.Tensor  # long [n]: global unit index (see `unit_index`)


def unit_index(position_ids: torch.Tensor) -> torch.Tensor:
    """`[N, L]` position ids → `[N, L]` global index of the document piece each column belongs to: a piece
    starts at every position id 0 and at every row start (a document cut by a row boundary is two pieces).
    Pieces are the independent units the bootstrap resamples."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.reshape(-1).long().cumsum(0).reshape(position_ids.shape) - 1


def _targets(ids: torch.Tensor, pos: torch.Tensor, loss_mask: torch.Tensor, units: torch.Tensor) -> _Targets:
    """The training positions of `[B, L]` rows (core.packing.training_positions: column j predicts the
    target j + 1), indexed into the `[B·(L−1)]` hidden states of columns 0 … L−2."""
    select, labels = training_positions(ids, pos, loss_mask)
    length = ids.shape[1]
    row, col = select // length, select % length
    return _Targets(row * (length - 1) + col, labels, units[row, col + 1])


@dataclass
class UnitSums:
    """Per-unit (document piece) sums over its target tokens, float64 `[U]` each: `tokens`, `nll` (nats,
    −log p_S(token)), `kl` (Σ KL(p_T ‖ p_S), nats), `agree` (count of argmax p_T = argmax p_S), `accept`
    (Σ_positions Σ_v min(p_T(v), p_S(v)), the speculative-decoding acceptance mass); `domain` long `[U]`.
    Units without target tokens are dropped."""

    domain: torch.Tensor
    tokens: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    agree: torch.Tensor
    accept: torch.Tensor

    def select(self, keep: torch.Tensor) -> UnitSums:
        return UnitSums(*(getattr(self, f)[keep] for f in ("domain", "tokens", "nll", "kl", "agree", "accept")))


def _teacher_states(teacher, student, h_s: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, key: tuple[int, int],
                    teacher_hidden: dict | None) -> torch.Tensor:
    """The teacher's `[B·(L−1), H]` hidden states of a batch: the student's own when it is the teacher,
    else from the memo or one teacher pass (stored in the memo)."""
    t_device = next(teacher.parameters()).device
    if teacher is student:
        h_t = h_s
    elif teacher_hidden is not None and key in teacher_hidden:
        return teacher_hidden[key].to(t_device)
    else:
        h_t = _hidden(teacher, ids.to(t_device), pos.to(t_device))
        h_t = h_t[:, :-1].reshape(-1, h_t.shape[-1])
    if teacher_hidden is not None:
        teacher_hidden[key] = h_t
    return h_t


@torch.inference_mode()
def intrinsic_sums(student, teacher, heldout: HeldOut, *, batch_size: int = 8, chunk_size: int = 512,
                   teacher_hidden: dict[tuple[int, int], torch.Tensor] | None = None) -> UnitSums:
    """Per-document-piece sums of `student` (a HF causal LM) on `heldout` against `teacher` (another model,
    or the same object: then KL is exactly 0, agreement and acceptance exactly 1 per token).

    Every target position gets full-vocabulary softmaxes of both models (`[chunk_size, V]` fp32 at a time).
    `teacher_hidden`, if given, memoises the teacher's hidden states per batch (keyed by first row and
    batch size), so several students cost one teacher pass; the teacher's own run fills it too.
    """
    units = unit_index(heldout.position_ids)
    num_units = int(units.max()) + 1 if units.numel() else 0
    sums = torch.zeros(5, num_units, dtype=torch.float64)  # tokens, nll, kl, agree, accept
    device = next(student.parameters()).device
    for start in range(0, heldout.input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        ids, pos = heldout.input_ids[sl], heldout.position_ids[sl]
        tg = _targets(ids, pos, heldout.loss_mask[sl], units[sl])
        h_s = _hidden(student, ids.to(device), pos.to(device))
        h_s = h_s[:, :-1].reshape(-1, h_s.shape[-1])
        h_t = _teacher_states(teacher, student, h_s, ids, pos, (start, batch_size), teacher_hidden)
        for c in range(0, tg.rows.numel(), chunk_size):
            rows = tg.rows[c:c + chunk_size]
            lp_s = head_logprobs(student, h_s[rows.to(device)])  # [n, V]
            lp_t = lp_s if teacher is student else head_logprobs(teacher, h_t[rows.to(h_t.device)]).to(device)
            if lp_s.shape[-1] != lp_t.shape[-1]:
                raise ValueError(f"vocab sizes differ: student {lp_s.shape[-1]}, teacher {lp_t.shape[-1]}")
            tokens = tg.tokens[c:c + chunk_size].to(device)
            per_token = torch.stack([
                torch.ones(rows.numel(), device=device),
                -lp_s.gather(-1, tokens[:, None])[:, 0],
                # KL(T‖S) = Σ_v p_T(v) (log p_T(v) − log p_S(v)); exactly 0 when the two rows are equal.
                (lp_t.exp() * (lp_t - lp_s)).sum(-1),
                (lp_t.argmax(-1) == lp_s.argmax(-1)).float(),
                torch.ones(rows.numel(), device=device) if teacher is student
                else torch.minimum(lp_t, lp_s).exp().sum(-1),
            ]).double().cpu()
            sums.index_add_(1, tg.units[c:c + chunk_size], per_token)
    first_domain = torch.zeros(num_units, dtype=torch.long)
    first_domain[units.reshape(-1)] = heldout.domain[:, None].expand_as(units).reshape(-1)
    out = UnitSums(first_domain, *sums)
    return out.select(out.tokens > 0)


def metrics_from_sums(sums: UnitSums, domains: list[str], suffix: str = "") -> dict[str, float]:
    """`ppl_<domain>`, `accept_<domain>` (mean Σ_v min(p_T, p_S) per target token) for every domain present,
    `ppl_all`, `kl_to_teacher` (nats/token), `top1_agreement`; each name followed by `suffix`."""
    total = float(sums.tokens.sum())
    if total == 0:
        raise ValueError("held-out set has no target tokens (loss_mask is all zero)")
    metrics = {}
    for i, d in enumerate(domains):
        sel = sums.domain == i
        n = float(sums.tokens[sel].sum())
        if n > 0:
            metrics[f"ppl_{d}{suffix}"] = math.exp(float(sums.nll[sel].sum()) / n)
            metrics[f"accept_{d}{suffix}"] = float(sums.accept[sel].sum()) / n
    metrics[f"ppl_all{suffix}"] = math.exp(float(sums.nll.sum()) / total)
    metrics[f"kl_to_teacher{suffix}"] = float(sums.kl.sum()) / total
    metrics[f"top1_agreement{suffix}"] = float(sums.agree.sum()) / total
    return metrics


def units_from_sums(sums: UnitSums, domains: list[str], suffix: str = "") -> dict[str, dict]:
    """The per-unit form of every metric of `metrics_from_sums` (evaluation/stats.py `Units` JSON)."""
    def entry(num: torch.Tensor, den: torch.Tensor, transform: str = "mean") -> dict:
        return {"num": num.tolist(), "den": den.tolist(), "transform": transform, "binomial": False}

    out = {}
    for i, d in enumerate(domains):
        sel = sums.domain == i
        if bool(sel.any()):
            out[f"ppl_{d}{suffix}"] = entry(sums.nll[sel], sums.tokens[sel], "exp")
            out[f"accept_{d}{suffix}"] = entry(sums.accept[sel], sums.tokens[sel])
    out[f"ppl_all{suffix}"] = entry(sums.nll, sums.tokens, "exp")
    out[f"kl_to_teacher{suffix}"] = entry(sums.kl, sums.tokens)
    out[f"top1_agreement{suffix}"] = entry(sums.agree, sums.tokens)
    return out


def intrinsic_metrics(student, teacher, heldout: HeldOut, *, batch_size: int = 8, chunk_size: int = 512,
                      teacher_hidden: dict[tuple[int, int], torch.Tensor] | None = None
                      ) -> tuple[dict[str, float], int]:
    """`metrics_from_sums` of `intrinsic_sums`, and the number of target tokens."""
    sums = intrinsic_sums(student, teacher, heldout, batch_size=batch_size, chunk_size=chunk_size,
                          teacher_hidden=teacher_hidden)
    return metrics_from_sums(sums, heldout.domains), int(sums.tokens.sum())
