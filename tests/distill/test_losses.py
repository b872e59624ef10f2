"""KD losses: divergence identities, temperature, tail handling, and chunked == unchunked (values and grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.records import TopK
from distill.losses import (
    ForwardKL,
    GeneralizedJSD,
    LossSpec,
    ReverseKL,
    SkewKL,
    chunked_loss,
    make_divergence,
    naive_full_vocab_loss,
    position_losses,
    student_rest_logmass,
    student_support_logprobs,
    teacher_support_logprobs,
    topk_from_logits,
)

LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_kl"]
TAILS = ["renormalize", "bucket"]


def _dist(n: int, s: int, seed: int) -> torch.Tensor:
    return torch.log_softmax(torch.randn(n, s, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


@pytest.mark.parametrize("name", LOSSES)
def test_divergences_are_nonnegative_and_zero_on_equal(name):
    p, q = _dist(5, 9, 0), _dist(5, 9, 1)
    div = make_divergence(name, 0.3)
    assert (div(p, q) > 0).all()
    torch.testing.assert_close(div(p, p), torch.zeros(5), atol=1e-6, rtol=0)


def test_divergence_formulas():
    p, q = _dist(4, 7, 2), _dist(4, 7, 3)
    kl_pq = (p.exp() * (p - q)).sum(-1)
    kl_qp = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(ForwardKL()(p, q), kl_pq)
    torch.testing.assert_close(ReverseKL()(p, q), kl_qp)
    # JSD end points are exactly forward / reverse KL; small β behaves like β·KL(p‖q).
    torch.testing.assert_close(GeneralizedJSD(0.0)(p, q), kl_pq)
    torch.testing.assert_close(GeneralizedJSD(1.0)(p, q), kl_qp)
    torch.testing.assert_close(GeneralizedJSD(1e-4)(p, q) / 1e-4, kl_pq, rtol=1e-2, atol=0)
    torch.testing.assert_close(GeneralizedJSD(1 - 1e-4)(p, q) / 1e-4, kl_qp, rtol=1e-2, atol=0)
    m = 0.5 * p.exp() + 0.5 * q.exp()
    jsd = 0.5 * (p.exp() * (p - m.log())).sum(-1) + 0.5 * (q.exp() * (q - m.log())).sum(-1)
    torch.testing.assert_close(GeneralizedJSD(0.5)(p, q), jsd)
    mix = (0.1 * p.exp() + 0.9 * q.exp()).log()
    torch.testing.assert_close(SkewKL(0.1)(p, q), (p.exp() * (p - mix)).sum(-1))
    torch.testing.assert_close(SkewKL(0.0)(p, q), kl_pq)
    with pytest.raises(ValueError, match="train.beta"):
        GeneralizedJSD(1.5)


def test_zero_probability_outcomes_do_not_make_nan():
    p = torch.tensor([[0.0, -float("inf"), -float("inf")]])
    q = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    assert torch.isfinite(ForwardKL()(p, q)).all()


def test_temperature_raises_probabilities_and_renormalises():
    logits = torch.randn(6, 50) * 3
    target = topk_from_logits(logits, k=10)
    for temperature in (0.5, 2.0):
        tempered = teacher_support_logprobs(target, "renormalize", temperature)
        # p^(1/T) renormalised over the top-k == softmax(z / T) restricted to the top-k and renormalised.
        expected = torch.log_softmax(logits.gather(-1, target.ids) / temperature, dim=-1)
        torch.testing.assert_close(tempered, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(tempered, target.logprobs / temperature)
        bucket = teacher_support_logprobs(target, "bucket", temperature)
        assert bucket.shape == (6, 11)
        torch.testing.assert_close(bucket.exp().sum(-1), torch.ones(6))


def test_student_support_bucket_holds_the_rest_mass():
    logits = torch.randn(4, 40)
    ids = topk_from_logits(torch.randn(4, 40), k=5).ids
    logq = torch.log_softmax(logits, -1)
    rest = student_rest_logmass(logq, ids)
    bucket = student_support_logprobs(logq.gather(-1, ids), rest, "bucket")
    torch.testing.assert_close(bucket.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(bucket[:, :5], logq.gather(-1, ids))
    # Exact even when the top-k holds nearly all the mass (1 − Σ top-k would cancel to 0 in fp32).
    peaked = torch.full((1, 40), -30.0)
    peaked[0, :5] = 0.0
    lp = torch.log_softmax(peaked, -1)
    expected = torch.log(torch.tensor(35.0)) - 30.0 - torch.logsumexp(peaked, -1)
    torch.testing.assert_close(student_rest_logmass(lp, torch.arange(5)[None]), expected)
    renorm = student_support_logprobs(logq.gather(-1, ids), None, "renormalize")
    torch.testing.assert_close(renorm, torch.log_softmax(logits.gather(-1, ids), -1))


def test_topk_record_matches_the_store_convention():
    logits = torch.randn(3, 30)
    t = topk_from_logits(logits, k=4)
    torch.testing.assert_close(t.tail_logmass, torch.log1p(-t.logprobs.exp().sum(-1)), atol=1e-6, rtol=0)
    assert (t.logprobs[:, :-1] >= t.logprobs[:, 1:]).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", LOSSES)
def test_kd_is_zero_when_student_equals_teacher(name, tail):
    logits = torch.randn(8, 60) * 2
    spec = LossSpec(loss=name, tail=tail, ce_weight=0.0, temperature=1.5, beta=0.2)
    _, kd, _ = position_losses(logits, torch.zeros(8, dtype=torch.long), topk_from_logits(logits, 6), spec)
    torch.testing.assert_close(kd, torch.zeros(8), atol=2e-6, rtol=0)


def test_ce_objective_is_cross_entropy():
    logits, labels = torch.randn(7, 33), torch.randint(0, 33, (7,))
    loss, kd, ce = position_losses(logits, labels, None, LossSpec(objective="ce"))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="none"))
    assert (kd == 0).all()
    with pytest.raises(ValueError, match="needs teacher targets"):
        position_losses(logits, labels, None, LossSpec(objective="kd"))


def test_mixed_loss_weights_kd_and_ce():
    logits, labels = torch.randn(5, 20), torch.randint(0, 20, (5,))
    target = topk_from_logits(torch.randn(5, 20), 4)
    spec = LossSpec(ce_weight=0.25, temperature=2.0)
    loss, kd, ce = position_losses(logits, labels, target, spec)
    logq = torch.log_softmax(logits, -1)
    student = student_support_logprobs(logq.gather(-1, target.ids), student_rest_logmass(logq, target.ids), "bucket")
    raw_kd = ForwardKL()(teacher_support_logprobs(target, "bucket", 2.0), torch.log_softmax(student / 2.0, -1))
    torch.testing.assert_close(kd, raw_kd * 4.0)  # × T²
    torch.testing.assert_close(loss, 0.75 * kd + 0.25 * ce)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", LOSSES)
def test_chunked_gradients_equal_unchunked(name, tail):
    gen = torch.Generator().manual_seed(0)
    n, h, v, k = 45, 24, 700, 12
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    position_weight = torch.rand(n, generator=gen) / n
    target = topk_from_logits(torch.randn(n, v, generator=gen) * 3, k)
    spec = LossSpec(loss=name, tail=tail, beta=0.3, temperature=2.0, ce_weight=0.2)

    ref = (position_losses(hidden @ weight.T, labels, target, spec)[0] * position_weight).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    for chunk in (7, 16, 1000):
        sums = chunked_loss(hidden, weight, labels, position_weight, target, spec, chunk_size=chunk)
        gh, gw = torch.autograd.grad(sums.loss * 3.0, (hidden, weight))  # upstream grad is honoured
        torch.testing.assert_close(sums.loss, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(gh, ref_gh * 3.0, atol=1e-5, rtol=0)
        torch.testing.assert_close(gw, ref_gw * 3.0, atol=1e-5, rtol=0)


def test_chunked_loss_without_grad_and_in_bf16():
    hidden = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (10,))
    with torch.no_grad():
        sums = chunked_loss(hidden, weight, labels, torch.ones(10), None, LossSpec(objective="ce"), 4)
    assert not sums.loss.requires_grad
    sums = chunked_loss(hidden, weight, labels, torch.ones(10), None, LossSpec(objective="ce"), 4)
    sums.loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    ref = F.cross_entropy(hidden.float() @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(sums.loss, ref, atol=1e-4, rtol=0)


def test_position_weights_zero_ignore_positions():
    hidden, weight = torch.randn(6, 4), torch.randn(30, 4)
    labels = torch.randint(0, 30, (6,))
    target = topk_from_logits(torch.randn(6, 30), 3)
    w = torch.tensor([1.0, 0, 1, 0, 0, 1])
    full = chunked_loss(hidden, weight, labels, w, target, LossSpec(), 2)
    keep = w.bool()
    part = chunked_loss(hidden[keep], weight, labels[keep], w[keep], TopK(*(t[keep] for t in target)), LossSpec(), 2)
    torch.testing.assert_close(full.loss, part.loss)


def test_naive_baseline_is_dense_forward_kl():
    logits = torch.randn(5, 25)
    target = topk_from_logits(torch.randn(5, 25), 25)  # k = V: the dense teacher is exact
    full_teacher = torch.log_softmax(target.logprobs, -1)
    dense = torch.zeros(5, 25).scatter(-1, target.ids, full_teacher.exp())
    expected = (dense * (dense.clamp_min(1e-30).log() - torch.log_softmax(logits, -1))).sum()
    torch.testing.assert_close(naive_full_vocab_loss(logits, target), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# On-policy losses against a full-vocabulary float64 reference
# ---------------------------------------------------------------------------------------------------


def _bucket_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int):
    """Float64 teacher and student distributions on the k + 1 support (the teacher's top-k ids, then one
    outcome for the rest of the vocabulary), computed from the full logits `[N, V]`."""
    logp_full = torch.log_softmax(teacher_logits.double(), -1)
    logq_full = torch.log_softmax(student_logits.double(), -1)
    ids = logp_full.topk(k, dim=-1).indices
    outside = torch.ones_like(logp_full, dtype=torch.bool).scatter(-1, ids, False)

    def support(logprobs):
        rest = torch.logsumexp(logprobs.masked_fill(~outside, float("-inf")), -1, keepdim=True)
        return torch.cat([logprobs.gather(-1, ids), rest.clamp_min(-60.0)], -1)  # empty rest: ~0, not 0

    return support(logp_full), support(logq_full), ids


def _reference_divergence(name: str, logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    def kl(log_a, log_b):  # outcomes of zero probability contribute 0
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if name == "reverse_kl":
        return kl(logq, logp)
    logm = (beta * logp.exp() + (1 - beta) * logq.exp()).log()
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


@pytest.mark.parametrize("k", [5, 40])  # 40 = V: the support is the whole vocabulary
@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_on_policy_divergences_match_full_vocab_float64(name, k):
    gen = torch.Generator().manual_seed(4)
    n, v = 9, 40
    student = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    spec = LossSpec(objective="on_policy", loss=name, beta=0.3, tail="bucket", ce_weight=0.0)
    _, kd, _ = position_losses(student, labels, topk_from_logits(teacher, k), spec)
    logp, logq, _ = _bucket_reference(student, teacher, k)
    ref = _reference_divergence(name, logp, logq, 0.3)
    if k == v:  # on the whole vocabulary the k + 1 support is exact
        full = _reference_divergence(name, torch.log_softmax(teacher, -1), torch.log_softmax(student, -1), 0.3)
        torch.testing.assert_close(ref, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(kd.double(), ref, atol=2e-6, rtol=0)
    grad, = torch.autograd.grad(kd.sum(), student)
    ref_grad, = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 6, 30])  # 30 = V
def test_sampled_reverse_kl_is_unbiased_in_value_and_gradient(k):
    """E_{y~q}[estimate at y] (summed exactly over every token y, weighted by q(y) in float64) equals reverse KL
    on the k + 1 support — the full-vocabulary reverse KL when k = V — and so does its gradient."""
    gen = torch.Generator().manual_seed(5)
    n, v = 4, 30
    student = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5
    target = topk_from_logits(teacher, k)
    spec = LossSpec(objective="on_policy", loss="sampled_reverse_kl", tail="bucket", ce_weight=0.0)
    every_y = torch.arange(v).repeat(n)  # position i with each token y: row i * v + y
    expanded = TopK(*(t.repeat_interleave(v, dim=0) for t in target))
    _, kd, _ = position_losses(student.repeat_interleave(v, dim=0), every_y, expanded, spec)
    q = torch.softmax(student, -1).detach().reshape(-1)
    expected = (q * kd.double()).reshape(n, v).sum(-1)
    logp, logq, _ = _bucket_reference(student, teacher, k)
    ref = _reference_divergence("reverse_kl", logp, logq, 0.0)
    if k == v:
        full = _reference_divergence("reverse_kl", torch.log_softmax(teacher, -1), torch.log_softmax(student, -1),
                                     0.0)
        torch.testing.assert_close(ref, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(expected, ref, atol=2e-6, rtol=0)
    grad, = torch.autograd.grad(expected.sum(), student)
    ref_grad, = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=0)


def test_sampled_reverse_kl_uses_the_sampled_tokens_teacher_logprob():
    teacher = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -1.0]]), -1)
    student = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.5, 0.0]]), -1)
    spec = LossSpec(objective="on_policy", loss="sampled_reverse_kl", tail="bucket", ce_weight=0.0)
    target = topk_from_logits(teacher, 2)  # ids 0, 1
    _, kd_in, _ = position_losses(student, torch.tensor([1]), target, spec)
    torch.testing.assert_close(kd_in, student[:, 1] - teacher[:, 1])
    _, kd_out, _ = position_losses(student, torch.tensor([3]), target, spec)  # outside: the rest bucket
    rest = lambda lp: torch.logsumexp(lp[:, 2:], -1)  # noqa: E731
    torch.testing.assert_close(kd_out, rest(student) - rest(teacher), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="tail=bucket"):
        position_losses(student, torch.tensor([1]), target, LossSpec(objective="on_policy",
                                                                     loss="sampled_reverse_kl",
                                                                     tail="renormalize"))


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "sampled_reverse_kl"])
def test_on_policy_chunked_gradients_equal_unchunked(name):
    gen = torch.Generator().manual_seed(6)
    n, h, v, k = 37, 16, 300, 8
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_()
    teacher = torch.randn(n, v, generator=gen) * 3
    target = topk_from_logits(teacher, k)
    # Half the labels are teacher top-k tokens, so both branches of the sampled estimator are exercised.
    labels = torch.where(torch.arange(n) % 2 == 0, target.ids[:, 0], torch.randint(0, v, (n,), generator=gen))
    position_weight = torch.full((n,), 1.0 / n)
    spec = LossSpec(objective="on_policy", loss=name, beta=0.4, tail="bucket", ce_weight=0.0)
    ref = (position_losses(hidden @ weight.T, labels, target, spec)[0] * position_weight).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    sums = chunked_loss(hidden, weight, labels, position_weight, target, spec, chunk_size=10)
    gh, gw = torch.autograd.grad(sums.loss, (hidden, weight))
    torch.testing.assert_close(sums.loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
