"""One interface for every teacher backend: score packed rows to top-k logprobs, and sample completions.

A backend turns token ids into what offline distillation stores: for every position t of a packed row, the
teacher's k most likely next tokens (the distribution over token t+1) with their raw log-softmax values, and
the log of the probability mass left outside those k. Rows are packed: documents follow each other and
`position_ids` restart at 0 where a document starts; a backend never lets one document see another.

Backends: `transformers` (an in-process forward pass, the embedded default), `vllm` (the offline vLLM engine)
and `vllm-server` (a client for a running OpenAI-compatible vLLM server), chosen by `TeacherConfig.backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from core.config import InputError, TeacherConfig
from core.records import TopK
from teachers.hf_backend import TransformersBackend
from teachers.vllm_backend import VLLMBackend, VLLMServerBackend


class TeacherBackend(Protocol):
    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        """Top-k next-token logprobs of every position of `input_ids` int [B, L]; documents are the runs of
        `position_ids` int [B, L] that start where it is 0 (and at column 0); no attention crosses them."""
        ...

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        """For each prompt, `n` sampled completions as token ids, without the prompt, cut before the first
        EOS (temperature 0 decodes greedily)."""
        ...

    def close(self) -> None:
        ...


def make_backend(cfg: TeacherConfig, model_dir: Path) -> TeacherBackend:
    """The backend named by `cfg.backend`, loading the teacher from the local HF folder `model_dir`."""
    if cfg.backend == "transformers":
        return TransformersBackend(cfg, model_dir)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg, model_dir)
    if cfg.backend == "vllm-server":
        return VLLMServerBackend(cfg, model_dir)
    raise InputError(f"teacher.backend: unknown backend {cfg.backend!r} (valid: transformers, vllm, vllm-server)")
