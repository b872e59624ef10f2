"""Distillation losses on top-k teacher targets, reduced in chunks over positions.

Notation (per training position, i.e. per token whose *next* token is a target):

- `z` `[V]`: the student's logits, `V` the vocabulary size.
- The teacher target is a top-k record (`TopK`): `ids` `[k]` (token ids, int64), `logprobs` `[k]` (raw teacher
  log-softmax at temperature 1, sorted descending) and `tail_logmass` `[]` = log(1 - Σ exp(logprobs)).
- Both distributions are put on one *support* of `S` outcomes before comparing them:
  - `tail="renormalize"` (S = k): drop the tail and renormalise; the teacher is p_i ∝ exp(logprobs_i) and the
    student q_i ∝ softmax(z)_i over the same k ids (the student's own mass outside them is ignored).
  - `tail="bucket"` (S = k + 1): the k ids plus one "rest" outcome holding the remaining mass; for the student
    q_rest = Σ_{j ∉ ids} softmax(z)_j, summed directly (no 1 − Σ top-k cancellation).
- Temperature T re-tempers both distributions *on the support*: probabilities are raised to 1/T and
  renormalised (p_T ∝ p^(1/T), i.e. `log_softmax(logp / T)` over the support — stored log-probabilities are
  never just divided by T), and the student's support distribution gets the same transform. For
  `renormalize` this is exactly softmax(z / T) restricted to the top-k, for teacher and student alike; for
  `bucket` the rest outcome is tempered as one outcome on both sides, so a student equal to the teacher
  still has zero loss. The divergence is multiplied by T² so gradient magnitudes do not shrink with T
  (Hinton et al., 2015).

The per-position loss is `(1 - ce_weight) · T² · D(p_T ‖ q_T) + ce_weight · CE`, where CE = -log softmax(z)[y]
on the ground-truth next token y at temperature 1; the "ce" objective is CE alone. The "on_policy" objective
(distill/on_policy.py) uses the same losses on completions the student sampled itself, where y is the sampled
token; there `sampled_reverse_kl` (`SampledReverseKL`) is also available: a one-sample estimate of reverse KL
that needs the teacher's log-probability of the sampled outcome only (k = 1 suffices).

`chunked_loss` never materialises a `[positions, V]` fp32 tensor for all positions: it walks over chunks of
positions, computes that chunk's logits `h @ Wᵀ`, the loss and its gradient w.r.t. the logits, and folds the
gradient straight into ∂/∂h and ∂/∂W. Peak extra memory is a few `[chunk, V]` fp32 buffers, and the lm_head
matmuls are done once each (no recomputation), so it is also not slower than the naive computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.records import TopK

LossName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "sampled_reverse_kl"]
TailMode = Literal["renormalize", "bucket"]


# ---------------------------------------------------------------------------------------------------
# Divergences between two distributions on the same support, given as log-probabilities `[N, S]`.
# `logp` is the teacher (no gradient), `logq` the student. Each returns the per-position value `[N]`, in nats.
# ---------------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_s a_s (log a_s − log b_s) `[N]`; outcomes with a_s = 0 contribute 0 (not 0·∞ = nan)."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q), computed in log space `[N, S]`."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


class ForwardKL(nn.Module):
    """Forward KL, mean-seeking: KL(p ‖ q) = Σ_s p_s (log p_s − log q_s). `[N, S], [N, S] → [N]`."""

    def forward(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return _kl(logp, logq)


class ReverseKL(nn.Module):
    """Reverse KL, mode-seeking: KL(q ‖ p) = Σ_s q_s (log q_s − log p_s). `[N, S], [N, S] → [N]`."""

    def forward(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return _kl(logq, logp)


class GeneralizedJSD(nn.Module):
    """Generalized Jensen–Shannon divergence (Agarwal et al., 2024, "GKD"). `[N, S], [N, S] → [N]`.

    JSD(β) = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m), with m = β·p + (1 − β)·q. For small β it behaves like
    β·KL(p ‖ q) and for β near 1 like (1 − β)·KL(q ‖ p); the end points are defined as exactly forward KL
    (β = 0) and reverse KL (β = 1), where the mixture formula would degenerate to 0.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"train.beta: JSD β must be in [0, 1], got {beta!r}")
        self.beta = beta

    def forward(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        if self.beta == 0.0:
            return _kl(logp, logq)
        if self.beta == 1.0:
            return _kl(logq, logp)
        logm = _log_mix(logp, logq, self.beta)
        return self.beta * _kl(logp, logm) + (1.0 - self.beta) * _kl(logq, logm)


class SkewKL(nn.Module):
    """Skew forward KL (Ko et al., 2024, "DistiLLM"): KL(p ‖ α·p + (1 − α)·q). `[N, S], [N, S] → [N]`.

    α = 0 is forward KL; a small α (e.g. 0.1) keeps the target finite where the student puts ~0 mass, which
    stabilises early training.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"train.beta: skew KL α must be in [0, 1), got {alpha!r}")
        self.alpha = alpha

    def forward(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:
            return _kl(logp, logq)
        return _kl(logp, _log_mix(logp, logq, self.alpha))


class SampledReverseKL(nn.Module):
    """Reverse KL estimated from the student's own sample (the per-token estimator of on-policy distillation,
    as in the Tinker cookbook): `[N], [N] → [N]`.

    Inputs are log-probabilities of the *sampled* outcome s ~ q on the support: `logp_s` the teacher's (no
    gradient), `logq_s` the student's. The value is the one-sample estimate d = log q_s − log p_s, whose
    expectation over s ~ q is KL(q ‖ p); the gradient is that of the score-function surrogate sg(d) · log q_s,
    d · ∇log q_s, whose expectation is ∇KL(q ‖ p) because E_q[∇log q_s] = 0. The reward −d of each token is
    its own (no sum over later tokens), as in GKD's per-token divergences. Unbiased only when s was drawn
    from q itself, at temperature 1 and without top-p truncation.
    """

    def forward(self, logp_s: torch.Tensor, logq_s: torch.Tensor) -> torch.Tensor:
        d = (logq_s - logp_s).detach()
        return d + d * (logq_s - logq_s.detach())


def sampled_outcome_logprobs(logp: torch.Tensor, logq: torch.Tensor, ids: torch.Tensor,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities `[N]` of the support outcome holding the sampled token `labels`
    `[N]`: its column when it is one of the teacher's `ids` `[N, k]`, else the last (rest) column of the
    bucket support `logp`, `logq` `[N, k + 1]`. Exact for the token itself when it is in the top-k; the rest
    bucket when not (so the estimate is of KL on the k + 1 support)."""
    match = ids == labels[:, None]
    column = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(labels, ids.shape[-1]))
    return logp.gather(-1, column[:, None]).squeeze(-1), logq.gather(-1, column[:, None]).squeeze(-1)


def make_divergence(name: LossName, beta: float) -> nn.Module:
    """The divergence module named by `train.loss` (`beta` is JSD's β or skew KL's α)."""
    if name == "forward_kl":
        return ForwardKL()
    if name == "reverse_kl":
        return ReverseKL()
    if name == "jsd":
        return GeneralizedJSD(beta)
    if name == "skew_kl":
        return SkewKL(beta)
    if name == "sampled_reverse_kl":
        return SampledReverseKL()
    raise ValueError(f"train.loss: unknown loss {name!r} "
                     "(valid: forward_kl, reverse_kl, jsd, skew_kl, sampled_reverse_kl)")


# ---------------------------------------------------------------------------------------------------
# Projecting teacher and student onto the common support
# ---------------------------------------------------------------------------------------------------


TEACHER_TAIL_FLOOR = -100.0  # log rest mass of a teacher whose top-k holds everything (the backends' floor)


def teacher_support_logprobs(target: TopK, tail: TailMode, temperature: float) -> torch.Tensor:
    """Teacher log-probabilities on the support, tempered: `[N, k]` (renormalize) or `[N, k + 1]` (bucket).

    Renormalising over the support also absorbs the rounding of quantised stored log-probabilities. A rest
    mass of exactly 0 (k = V) is raised to e^TEACHER_TAIL_FLOOR, as the backends store it, so that reverse KL
    stays finite against the student's own floored rest mass.
    """
    logp = target.logprobs.float()
    if tail == "bucket":
        logp = torch.cat([logp, target.tail_logmass.float().clamp_min(TEACHER_TAIL_FLOOR)[:, None]], dim=-1)
    return torch.log_softmax(logp / temperature, dim=-1)


REST_MASS_FLOOR = 1e-30  # the student's rest-bucket mass is clamped here, so log and 1/mass stay finite


def student_rest_logmass(logq_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{j ∉ ids} softmax(z)_j `[N]` from `logq_full` `[N, V]` = log_softmax(z), `ids` `[N, k]`.

    Summed directly over the other V − k probabilities rather than taken as 1 − Σ top-k, which would cancel
    to 0 when the top-k holds nearly all the mass; clamped at `REST_MASS_FLOOR`."""
    rest_mass = logq_full.exp().scatter(-1, ids, 0.0).sum(-1)
    return torch.log(rest_mass.clamp_min(REST_MASS_FLOOR))


def student_support_logprobs(picked: torch.Tensor, rest: torch.Tensor | None, tail: TailMode) -> torch.Tensor:
    """Student log-probabilities on the teacher's support, before temperature: from `picked` `[N, k]`
    (log_softmax(z) at the teacher's ids) and `rest` `[N]` (`student_rest_logmass`, bucket only) →
    `[N, k]` (renormalize) or `[N, k + 1]` (bucket, last column the rest outcome)."""
    if tail == "renormalize":
        return torch.log_softmax(picked, dim=-1)
    return torch.cat([picked, rest[:, None]], dim=-1)


# ---------------------------------------------------------------------------------------------------
# The per-position loss (reference, unchunked) and its chunked reduction
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What to compute: `objective` "kd" or "on_policy" (both need teacher targets) or "ce"; see the module
    docstring."""

    objective: Literal["kd", "ce", "on_policy"] = "kd"
    loss: LossName = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    tail: TailMode = "bucket"
    ce_weight: float = 0.1

    @classmethod
    def from_config(cls, train_cfg) -> LossSpec:
        """From a `core.config.TrainConfig`."""
        return cls(objective=train_cfg.objective, loss=train_cfg.loss, beta=train_cfg.beta,
                   temperature=train_cfg.temperature, tail=train_cfg.tail, ce_weight=train_cfg.ce_weight)


def support_losses(ce: torch.Tensor, picked: torch.Tensor | None, rest: torch.Tensor | None,
                   target: TopK | None, spec: LossSpec,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The losses from the few per-position student quantities they depend on: `ce` `[N]` (−log softmax(z)[y]),
    `picked` `[N, k]` (log softmax(z) at the teacher ids) and `rest` `[N]` (student rest log-mass, bucket);
    `labels` `[N]` (the next tokens y) only for "sampled_reverse_kl".
    Returns `(loss, kd, ce)`, each `[N]`. Differentiable in `ce`, `picked`, `rest`."""
    if spec.objective == "ce":
        return ce, torch.zeros_like(ce), ce
    if target is None:
        raise ValueError(f"objective {spec.objective!r} needs teacher targets (an offline logit store or an "
                         "online teacher)")
    logp = teacher_support_logprobs(target, spec.tail, spec.temperature)
    logq = student_support_logprobs(picked, rest, spec.tail)
    if spec.temperature != 1.0:
        logq = torch.log_softmax(logq / spec.temperature, dim=-1)
    if spec.loss == "sampled_reverse_kl":
        if labels is None or spec.tail != "bucket":
            raise ValueError("train.loss=sampled_reverse_kl: needs the sampled tokens and train.tail=bucket")
        logp, logq = sampled_outcome_logprobs(logp, logq, target.ids, labels)
    kd = make_divergence(spec.loss, spec.beta)(logp, logq) * spec.temperature**2
    return (1.0 - spec.ce_weight) * kd + spec.ce_weight * ce, kd, ce


def position_losses(logits: torch.Tensor, labels: torch.Tensor, target: TopK | None,
                    spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position losses for `N` positions, the plain (unchunked, autograd) reference. `logits` `[N, V]`
    (any float dtype; computed in fp32), `labels` int64 `[N]` (ground-truth next tokens), `target` the
    teacher's `TopK` (`None` for "ce").

    Returns `(loss, kd, ce)`, each fp32 `[N]` in nats: the weighted total, the T²-scaled divergence (zeros for
    "ce") and the cross-entropy.
    """
    logq_full = torch.log_softmax(logits.float(), dim=-1)
    ce = -logq_full.gather(-1, labels[:, None]).squeeze(-1)
    picked = rest = None
    if target is not None and spec.objective != "ce":
        picked = logq_full.gather(-1, target.ids)
        rest = student_rest_logmass(logq_full, target.ids) if spec.tail == "bucket" else None
    return support_losses(ce, picked, rest, target, spec, labels)


class LossSums(NamedTuple):
    """Sums over positions (weighted by the per-position weights), fp32 scalars; only `loss` has a gradient."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, target: TopK | None,
                         position_weight: torch.Tensor, spec: LossSpec,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sums `[3]` (loss, kd, ce, weighted) of one chunk and ∂loss/∂logits `[C, V]` (None without grad).

    `logits` `[C, V]` fp32 is consumed (overwritten). Autograd runs only on the small per-position
    quantities (`support_losses`); their gradients G = ∂L/∂picked `[C, k]`, g_r = ∂L/∂rest, g_ce = ∂L/∂ce
    `[C]` are mapped to the logits with s = softmax(z), r = Σ_{j∉ids} s_j:
        ∂L/∂z_j = s_j · (g_ce − ΣG − g_r) + [j ∉ ids] · g_r · s_j / r + Σ_i G_i [j = ids_i] − g_ce [j = y].
    Only two `[C, V]` buffers are ever alive (logits → log-probs → probabilities → gradient, in place).
    """
    logq_full = torch.log_softmax(logits, dim=-1)
    del logits
    ce = -logq_full.gather(-1, labels[:, None]).squeeze(-1)
    kd_target = target is not None and spec.objective != "ce"
    picked = logq_full.gather(-1, target.ids) if kd_target else None
    probs = logq_full.exp_()  # from here on the buffer holds s = softmax(z)
    rest = None
    if kd_target:
        s_ids = picked.exp()
        probs.scatter_(-1, target.ids, 0.0)  # probs is now s with the teacher ids zeroed
        if spec.tail == "bucket":
            rest_mass = probs.sum(-1).clamp_min(REST_MASS_FLOOR)
            rest = rest_mass.log()
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need_grad) if t is not None else None for t in (ce, picked, rest)]
        loss, kd, ce_out = support_losses(*leaves, target, spec, labels)
        weighted = (loss * position_weight).sum()
        sums = torch.stack([weighted.detach(), (kd.detach() * position_weight).sum(),
                            (ce_out.detach() * position_weight).sum()])
        if not need_grad:
            return sums, None
        wanted = [t for t in leaves if t is not None]
        grads = dict(zip((id(t) for t in wanted), torch.autograd.grad(weighted, wanted, allow_unused=True),
                         strict=True))
    g_ce = grads[id(leaves[0])]
    g_ce = torch.zeros_like(ce) if g_ce is None else g_ce
    if not kd_target:
        grad = probs.mul_(g_ce[:, None])
        grad.scatter_add_(-1, labels[:, None], -g_ce[:, None])
        return sums, grad
    g_picked = grads[id(leaves[1])]
    g_rest = grads[id(leaves[2])] if rest is not None else None
    g_picked = torch.zeros_like(picked) if g_picked is None else g_picked
    coef = g_ce - g_picked.sum(-1)
    row = coef.clone()
    if g_rest is not None:
        coef = coef - g_rest
        row = coef + g_rest / rest_mass  # the [j ∉ ids] term, folded into the per-row factor
    grad = probs.mul_(row[:, None])  # zero at the ids (probs was zeroed there)
    grad.scatter_add_(-1, target.ids, g_picked + s_ids * coef[:, None])
    grad.scatter_add_(-1, labels[:, None], -g_ce[:, None])
    return sums, grad


class _ChunkedLoss(torch.autograd.Function):
    """Σ_n w_n · loss(h_n Wᵀ) with the gradient computed chunk by chunk during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, position_weight, ids, logprobs, tail_logmass, spec, chunk_size,
                need_grad):
        w32 = weight.detach().float()
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_grad else None
        grad_weight = torch.zeros_like(w32) if need_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].detach().float()
            target = TopK(ids[start:end], logprobs[start:end], tail_logmass[start:end]) if ids is not None else None
            chunk_sums, grad_logits = _chunk_loss_and_grad(h @ w32.T, labels[start:end], target,
                                                           position_weight[start:end], spec, need_grad)
            sums += chunk_sums
            if need_grad:
                # Fold ∂L/∂logits into ∂L/∂h and ∂L/∂W now, then drop the [chunk, V] buffer.
                grad_hidden[start:end] = grad_logits @ w32
                grad_weight.addmm_(grad_logits.T, h)
                del grad_logits
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums[1].clone(), sums[2].clone()

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None, None, None, None, None)


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 position_weight: torch.Tensor, target: TopK | None, spec: LossSpec,
                 chunk_size: int = 512) -> LossSums:
    """Σ_n w_n · loss_n over `N` positions without materialising `[N, V]` fp32 logits.

    `hidden` `[N, H]` (the student's final hidden states at the training positions, any float dtype),
    `weight` `[V, H]` (the lm_head / tied embedding matrix), `labels` int64 `[N]`, `position_weight` fp32 `[N]`
    (e.g. 1/token-count, 0 to ignore a position), `target` a `TopK` over the same `N` positions (or None for
    "ce"), `chunk_size` positions per chunk. Gradients flow to `hidden` and `weight` and equal those of
    `(position_losses(hidden @ weight.T, ...)[0] * position_weight).sum()` up to float rounding.
    Logits are computed in fp32 whatever the autocast state.
    """
    if chunk_size <= 0:
        raise ValueError(f"train.loss_chunk_size: must be > 0, got {chunk_size!r}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    ids, logprobs, tail_logmass = target if target is not None else (None, None, None)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss, kd, ce = _ChunkedLoss.apply(hidden, weight, labels, position_weight.float(), ids, logprobs,
                                          tail_logmass, spec, chunk_size, need_grad)
    return LossSums(loss, kd, ce)


def topk_from_logits(logits: torch.Tensor, k: int) -> TopK:
    """A teacher's `TopK` record from its full logits `[N, V]` (log-softmax in fp32, then the k largest)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logprobs.topk(k, dim=-1)
    rest = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return TopK(ids, top, rest)


def naive_full_vocab_loss(logits: torch.Tensor, target: TopK, temperature: float = 1.0) -> torch.Tensor:
    """The baseline `chunked_loss` is measured against: forward KL over the full vocabulary with the top-k
    teacher scattered into a dense `[N, V]` fp32 distribution (tail dropped and renormalised). Returns the sum
    over positions. Materialises several `[N, V]` fp32 tensors — for benchmarks and tests only."""
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    p_top = torch.softmax(target.logprobs.float() / temperature, dim=-1)
    dense = torch.zeros_like(logq).scatter_(-1, target.ids, p_top)
    return F.kl_div(logq, dense, reduction="sum") * temperature**2
