"""Greedy generation through the offline vLLM engine, for the gap suite's generative tasks.

`VLLMEvalModel.generate` keeps the contract of `EvalModel.generate` (evaluation/lm.py): the same prompt ids
(`encode_prompts`: same tokenizer, same left cut), greedy decoding, the same `max_new_tokens`, stop strings
and EOS, and the same decoding of the generated ids (`decode_completion`). What changes is the engine: all
prompts of a task go to vLLM in one call and its scheduler batches them continuously. The engine is
`teachers.vllm_backend.VLLMBackend`, configured by a `TeacherConfig` (dtype, tensor_parallel_size,
gpu_memory_utilization, max_model_len); one engine per model, `close` it before the next model loads.

Continuation scoring (`score`) is not offered: the multiple-choice and intrinsic tasks stay on transformers.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from core.artifacts import TOKENIZER_FILES, tokenizer_folder
from core.config import TeacherConfig
from evaluation.lm import decode_completion, encode_prompts
from teachers.resolve import load_tokenizer
from teachers.vllm_backend import VLLMBackend


def _with_tokenizer(model_dir: Path, tokenizer_dir: Path, view: Path) -> Path:
    """`view` filled with links to every file of `model_dir` plus the tokenizer files of `tokenizer_dir`:
    vLLM reads weights and tokenizer from one folder, and a training checkpoint has no tokenizer."""

    for src in model_dir.iterdir():
        if src.is_file():
            (view / src.name).symlink_to(src.resolve())
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and not (view / name).exists():
            (view / name).symlink_to((tokenizer_dir / name).resolve())
    return view


class VLLMEvalModel:
    """A model folder loaded in vLLM, with `generate` as in `evaluation.lm.EvalModel`."""

    def __init__(self, path: Path, *, engine: TeacherConfig, tokenizer_path: Path | None = None) -> None:
        """`engine`: the vLLM settings (its `model` and `backend` fields are not read). `tokenizer_path`:
        where to read the tokenizer when `path` has none."""

        self.path = Path(path)
        folder = tokenizer_folder(self.path, tokenizer_path)
        self._view = None
        if folder != self.path:
            self._view = tempfile.TemporaryDirectory(prefix="distill-vllm-view-")
            folder = _with_tokenizer(self.path, folder, Path(self._view.name))
        self.tokenizer = load_tokenizer(folder)
        self.backend = VLLMBackend(engine, folder)
        # As EvalModel: the model's positions bound prompt + generation, here also the engine's max_model_len.
        positions = json.loads((self.path / "config.json").read_text()).get("max_position_embeddings") or 2048
        self.max_length = min(int(positions), self.backend.llm.model_config.max_model_len)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 batch_size: int = 8) -> list[str]:
        """Greedy continuations of `prompts` (generated text only), each ending at EOS, at the first stop
        string (excluded) or after `max_new_tokens` tokens. `batch_size` is not used: vLLM schedules all
        prompts at once within its KV-cache budget."""
        from vllm import SamplingParams, TokensPrompt

        encoded = encode_prompts(self.tokenizer, prompts, max_length=self.max_length,
                                 max_new_tokens=max_new_tokens, where=self.path)
        # temperature 0 is greedy; vLLM stops at the stop strings and EOS ids (tokenizer + generation_config).
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None)
        outputs = self.backend.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                            use_tqdm=False)
        # Decode the ids as the transformers path does (vLLM's own text is incremental and already cut).
        return [decode_completion(self.tokenizer, out.outputs[0].token_ids, stop) for out in outputs]

    def close(self) -> None:
        """Shut the engine down (its worker process and memory) and remove the tokenizer view, if any."""
        self.backend.close()
        if self._view is not None:
            self._view.cleanup()
            self._view = None
