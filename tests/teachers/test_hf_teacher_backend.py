"""The transformers backend: chunked top-k is exact, packed documents stay apart, sampling works."""

from __future__ import annotations

import socket

import pytest
import torch
from teacher_testdata import packed_rows

from core.config import TeacherConfig
from core.packing import document_spans
from core.records import TopK
from teachers.backend import make_backend
from teachers.hf_backend import TransformersBackend, blockwise_topk, chunked_topk
from teachers.topk import tail_logmass_from_topk


@pytest.fixture(scope="module")
def backend(tiny_teacher_dir):
    be = make_backend(TeacherConfig(model=str(tiny_teacher_dir), topk_chunk_size=37, batch_size=2), tiny_teacher_dir)
    assert isinstance(be, TransformersBackend)
    yield be
    be.close()


def test_chunked_topk_equals_full_log_softmax(backend):
    head = backend.model.get_output_embeddings()
    hidden = torch.randn(100, head.in_features) * 3
    hidden[:7] *= 300  # one chunk of logits far outside ±60: exp needs the per-row shift there
    with torch.inference_mode():
        ids, lps, tail = chunked_topk(hidden, head, 16, chunk_size=7)
        # The same through a reused logits buffer (what the backend does for a float32 Linear head).
        in_workspace = chunked_topk(hidden, head, 16, chunk_size=7, workspace=torch.empty(7, head.out_features))
        logits = head(hidden)
        assert logits[:7].abs().amax(-1).min() > 60 and logits[7:].abs().max() < 60
        full = logits.double().log_softmax(-1)
    assert torch.equal(in_workspace[0], ids)
    torch.testing.assert_close(in_workspace[1], lps, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_workspace[2], tail, rtol=0, atol=1e-5)
    ref_lp, ref_ids = full.topk(16, -1)
    assert torch.equal(ids, ref_ids)
    # float32 resolves logits of size ~|x| to ~|x| · 1e-7: a few ulps at the big logits of the first chunk.
    atol = torch.full((100, 1), 1e-5, dtype=torch.float64)
    atol[:7] = 1e-6 * logits[:7].abs().amax(-1, keepdim=True)
    assert ((lps.double() - ref_lp).abs() <= atol).all()
    ref_tail = torch.log1p(-ref_lp.exp().sum(-1))
    assert torch.allclose(tail[7:].double(), ref_tail[7:], atol=1e-4)
    # Where only the top-k is known, the tail from 1 - sum agrees (for non-negligible tails).
    assert torch.allclose(tail_logmass_from_topk(lps[7:]).double(), ref_tail[7:], atol=1e-3)


def test_blockwise_topk_is_torch_topk():
    torch.manual_seed(0)
    for vocab in (49152, 8210, 300):  # whole blocks, a partial last block, too short (falls back)
        logits = torch.randn(64, vocab) * 4
        logits[0, :16] = 50.0  # one row's top values all in the first blocks, with ties
        logits[1] = 1.0  # a row of ties only
        values, ids = blockwise_topk(logits, 16)
        ref_values, ref_ids = torch.topk(logits, 16, dim=-1)
        assert torch.equal(values, ref_values)
        assert torch.equal(logits.gather(-1, ids), values)
        assert torch.equal(ids[2:].sort(-1).values, ref_ids[2:].sort(-1).values)
        assert torch.equal(ids[0].sort().values, torch.arange(16))
        assert ids[1].unique().numel() == 16


def test_packed_documents_are_scored_as_if_alone(backend, eos_id):
    ids, pos = packed_rows(2, 40, 49152, eos_id, seed=3)
    tops = backend.score(ids, pos, k=8)
    assert len(tops) == 2 and isinstance(tops[0], TopK)
    assert tops[0].ids.shape == (40, 8) and tops[0].ids.dtype == torch.int64
    assert tops[0].logprobs.dtype == torch.float32 and tops[0].tail_logmass.shape == (40,)
    assert (tops[0].logprobs[:, :-1] >= tops[0].logprobs[:, 1:]).all()
    checked = 0
    for row in range(2):
        for start, end in document_spans(pos[row]):
            alone = backend.score(ids[row:row + 1, start:end], torch.arange(end - start)[None], k=8)[0]
            assert torch.equal(alone.ids, tops[row].ids[start:end])
            assert torch.allclose(alone.logprobs, tops[row].logprobs[start:end], atol=1e-4)
            assert torch.allclose(alone.tail_logmass, tops[row].tail_logmass[start:end], atol=1e-4)
            checked += 1
    assert checked >= 4  # the rows really hold several documents


def test_score_rejects_k_above_vocab(backend):
    with pytest.raises(ValueError, match="top_k"):
        backend.score(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], k=49153)


def test_generate_samples_n_completions_reproducibly(backend, eos_id):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [100, 200, 300]]
    out = backend.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)
    assert len(out) == 3 and all(len(samples) == 3 for samples in out)
    assert all(len(s) <= 6 and eos_id not in s for samples in out for s in samples)
    assert out == backend.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)
    assert len({tuple(s) for samples in out for s in samples}) > 1  # sampling, not one repeated answer

    greedy = backend.generate(prompts[:1], n=2, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0)[0]
    assert greedy[0] == greedy[1]
    seq = list(prompts[0])
    with torch.inference_mode():
        for _ in range(len(greedy[0])):
            seq.append(int(backend.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompts[0]):] == greedy[0]


def test_vllm_server_client_names_an_unreachable_url(tiny_teacher_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}.*teacher.server_url"):
        make_backend(TeacherConfig(model=str(tiny_teacher_dir), backend="vllm-server",
                                   server_url=f"http://127.0.0.1:{port}"), tiny_teacher_dir)
