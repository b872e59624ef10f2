"""The `train` stage: distil the teacher into the student with one readable training loop on `accelerate`.

`run_training` is the loop (also used by the annealing stage); `train` wires it to a run directory.
`DistillationRecipe` holds the phase's pieces; one optimizer step (`_train_step`):

1. Draw `grad_accum` micro-batches of `batch_size` packed rows per process from the mixture sampler.
2. Find the training positions: position t trains on token t+1 iff `loss_mask[t+1] = 1` and token t+1 is not
   the first token of a new document (`position_ids[t+1] ≠ 0`), so no loss ever crosses a document boundary.
3. Teacher targets for those positions: the offline logit store (`teachers.store.LogitStore`), or an online
   teacher (`teachers.backend.make_backend`) scoring the same rows in-process — both give the same top-k record,
   so the loss code path is identical. Objective "on_policy" replaces steps 1–3: the rows are prompts with
   completions sampled by the student itself (or the teacher, for a share 1 − λ), the training positions
   the completion tokens, scored by the online teacher (`distill.on_policy.OnPolicyBatches`).
4. Student forward with a block-diagonal document mask (`core.packing.document_causal_mask`), then the
   chunked loss (`distill.losses.chunked_loss`) on the final hidden states: no `[B, L, V]` fp32 logits.
5. Every position of the *global* batch (all micro-batches, all processes) has the same weight, so the loss
   and gradient equal those of one big batch whatever the process count or accumulation.
6. Non-finite loss or gradient norm → `NonFiniteLossError` before the optimizer step (no checkpoint is
   written, the last good one stays); else clip, set the LR from `lr_at(step)`, step.
7. Log (JSONL every step, console/TensorBoard every `log_every`), checkpoint at the chosen steps.

Launch on several processes with `torchrun --nproc-per-node N -m distill.trainer CONFIG RUN_DIR [key=value ...]`
or `accelerate launch --multi_gpu --num_processes N -m distill.trainer ...` (on a host without GPUs it runs on
CPU over gloo); `train.parallelism=fsdp` shards the student (FSDP2) instead of replicating it (DDP), with
sharded checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_text,
    check_compatible,
    is_complete,
    read_manifest,
    tokenizer_folder,
    tokenizer_hash,
    write_manifest,
)
from core.checkpoint import (
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    save_sharded_state,
    staging_dir,
)
from core.config import RunConfig, RunStopped, to_dict
from core.packed import PackedRows
from core.packing import document_causal_mask
from core.records import eos_token_ids, model_vocab_size
from distill.batches import MicroBatch, OfflineTargets, OnlineTargets, TargetSource, make_micro_batch
from distill.losses import LossSpec, LossSums, chunked_loss
from distill.mixture import MixtureSampler, domain_weights
from distill.on_policy import OnPolicyBatches, PromptSampler, check_served_teacher, encode_training_prompts
from distill.schedule import schedule_from_config
from distill.student_vllm import StudentVLLM
from evaluation.plots import pyplot, save_png
from teachers.backend import make_backend
from teachers.resolve import load_tokenizer, resolve_teacher
from teachers.store import LogitStore

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RunStopped):
    """A step produced a NaN/inf loss or gradient; training stopped before the optimizer step."""


# ---------------------------------------------------------------------------------------------------
# The student with its loss (one module, so DDP/FSDP see the whole computation in forward)
# ---------------------------------------------------------------------------------------------------


class DistillationModule(nn.Module):
    """Wraps a HF causal LM; `forward(batch, position_weight)` returns the chunked loss sums (`LossSums`)."""

    def __init__(self, student: nn.Module, spec: LossSpec, chunk_size: int) -> None:
        super().__init__()
        self.student = student
        self.spec = spec
        self.chunk_size = chunk_size

    def forward(self, batch: MicroBatch, position_weight: float) -> LossSums:
        mask = document_causal_mask(batch.position_ids, dtype=self._compute_dtype(batch.input_ids.device))
        hidden = self.student.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            attention_mask=mask, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.select]
        weight = self.student.get_output_embeddings().weight
        weights = torch.full((hidden.shape[0],), position_weight, device=hidden.device)
        return chunked_loss(hidden, weight, batch.labels, weights, batch.target, self.spec, self.chunk_size)

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        # The additive mask must match the attention's compute dtype (bf16/fp16 under autocast).
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return next(self.student.parameters()).dtype


# ---------------------------------------------------------------------------------------------------
# Metrics: JSONL, TensorBoard, loss plot
# ---------------------------------------------------------------------------------------------------


class MetricsLog:
    """`metrics.jsonl`, one JSON object per optimizer step. On resume, lines past the checkpoint (written by a
    run that was killed before its next checkpoint) are dropped so the curve continues without duplicates."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a")  # noqa: SIM115 — kept open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Loss (total, KD, CE) and LR against step, as a PNG."""
    plt = pyplot()

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("kd", "--"), ("ce", ":")):
        if any(r.get(key) for r in records):
            ax.plot(steps, [r.get(key) for r in records], style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="grey", alpha=0.4, linewidth=1)
    lr_ax.set_ylabel("learning rate", color="grey")
    ax.set_title(f"training loss — {metrics_path.parent.name}")
    fig.tight_layout()
    save_png(fig, png_path)


# ---------------------------------------------------------------------------------------------------
# The reusable training phase
# ---------------------------------------------------------------------------------------------------


def _make_targets(cfg: RunConfig, run_dir: Path, student_hash: str, vocab_size: int,
                  num_rows: int, device: torch.device) -> TargetSource | None:
    """The teacher-target source for objective "kd", after refusing an incompatible store or teacher."""
    if cfg.train.objective != "kd":
        return None
    if cfg.train.teacher_source == "offline":
        logits_dir = run_dir / "logits"
        store = LogitStore(logits_dir)
        check_compatible(store.manifest, tokenizer_hash=student_hash, vocab_size=vocab_size, where=logits_dir)
        if len(store) < num_rows:
            raise ArtifactError(f"{logits_dir}: holds {len(store)} sequences but data/ has {num_rows} train rows")
        return OfflineTargets(store)
    backend, _ = _online_teacher(cfg, student_hash, vocab_size, device)
    return OnlineTargets(backend, cfg.capture.top_k)


def _online_teacher(cfg: RunConfig, student_hash: str, vocab_size: int, device: torch.device) -> tuple[Any, Path]:
    """(the teacher backend, its local folder), after refusing a teacher with another tokenizer or vocabulary
    (and, for `vllm-server`, a server that is down or serves another model)."""

    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    teacher_vocab = model_vocab_size(teacher_dir)
    teacher_tokenizer = load_tokenizer(teacher_dir)
    identity = {"tokenizer_hash": tokenizer_hash(teacher_tokenizer), "vocab_size": teacher_vocab}
    check_compatible({"teacher": identity}, tokenizer_hash=student_hash, vocab_size=vocab_size,
                     where=f"teacher {cfg.teacher.model}")
    if cfg.teacher.backend == "vllm-server":
        check_served_teacher(cfg.teacher, teacher_dir, teacher_tokenizer)
    teacher_cfg = cfg.teacher
    if teacher_cfg.backend == "transformers" and teacher_cfg.device == "auto":
        # The online teacher lives next to this process's student (its own GPU under DDP).
        teacher_cfg = type(teacher_cfg)(**{**to_dict(teacher_cfg), "device": str(device)})
    return make_backend(teacher_cfg, teacher_dir), teacher_dir


def run_training(cfg: RunConfig, run_dir: Path, *, out_dir: Path, init_from: Path, weights: dict[str, float],
                 num_steps: int, lr_at: Callable[[int], float], save_at: set[int], resume: bool = True) -> Path:
    """Train the student in `init_from` (a checkpoint folder or HF folder) for `num_steps` optimizer steps.

    Data: `run_dir/data` sampled by domain `weights`; teacher targets per `cfg.train` (offline store in
    `run_dir/logits` or online teacher). `lr_at(step)` is the absolute LR of step `0..num_steps-1`.
    Checkpoints go to `out_dir/checkpoints/step-XXXXXX` at every step in `save_at` (never pruned), every
    `cfg.train.save_every` steps (pruned to the newest `keep_last`) and at the last step; the final HF folder
    (weights + tokenizer) to `out_dir/final`. With `resume`, continues from the newest checkpoint in `out_dir`.
    Returns `out_dir`.
    """
    if num_steps <= 0:
        raise ValueError(f"run_training: num_steps must be > 0, got {num_steps}")
    recipe = DistillationRecipe(cfg, Path(run_dir), Path(out_dir), num_steps)
    checkpoint = latest_checkpoint(recipe.out_dir) if resume else None
    if recipe.is_finished(checkpoint):
        return recipe.out_dir
    recipe.setup(Path(init_from), checkpoint, weights)
    try:
        recipe.train(lr_at, save_at)
        recipe.export()
    finally:
        if recipe.on_policy is not None:
            recipe.on_policy.close()  # a colocated vLLM engine gives its memory back
    return recipe.out_dir


class DistillationRecipe:
    """One training phase, in the order a reader follows it: `setup` (accelerator, student, data, teacher
    targets, sampler, optimizer; `_resume` from a checkpoint) → `train` (per optimizer step `_train_step`,
    then `_log` and `_save`) → `export` (the final HF folder).

    Parallelism (`train.parallelism`, several processes): `ddp` through `accelerator.prepare`, or `fsdp`:
    FSDP2 (`torch.distributed.fsdp.fully_shard`, each decoder layer then the whole module) with sharded
    checkpoints through `torch.distributed.checkpoint`. accelerate sets up the processes in both cases
    (its FSDP plugin is GPU-only; FSDP2 itself runs on CPU over gloo, so the same code is tested here).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, out_dir: Path, num_steps: int) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.tcfg = cfg, cfg.train
        self.run_dir, self.out_dir, self.num_steps = run_dir, out_dir, num_steps
        self.accelerator = Accelerator(mixed_precision=self.tcfg.mixed_precision, cpu=cpu_only())
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.fsdp = self.tcfg.parallelism == "fsdp" and self.world > 1
        set_seed(self.tcfg.seed)

    def is_finished(self, checkpoint: Path | None) -> bool:
        """True when `checkpoint` is the last step and final/ was exported; refuses one past the end."""
        step = checkpoint_step(checkpoint) if checkpoint is not None else 0
        if step > self.num_steps:
            raise ArtifactError(f"{checkpoint}: is past num_steps={self.num_steps}; was the config changed? "
                                f"Delete {self.out_dir} to start over")
        return step == self.num_steps and (self.out_dir / "final" / "config.json").is_file()

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, init_from: Path, checkpoint: Path | None, weights: dict[str, float]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer


        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(init_from, self.run_dir / "student_init"))
        student = AutoModelForCausalLM.from_pretrained(checkpoint or init_from, dtype=torch.float32)
        vocab_size, student_hash = int(student.config.vocab_size), tokenizer_hash(self.tokenizer)
        data_dir = self.run_dir / "data"
        data_manifest = read_manifest(data_dir, "data")
        check_compatible(data_manifest, tokenizer_hash=student_hash, vocab_size=vocab_size, where=data_dir)
        self.rows = PackedRows(data_dir)
        self.targets = _make_targets(self.cfg, self.run_dir, student_hash, vocab_size, len(self.rows),
                                     self.accelerator.device)
        self.on_policy = None
        if self.tcfg.objective == "on_policy":
            self.sampler = self._setup_on_policy(student_hash, vocab_size, checkpoint or init_from)
        else:
            self.sampler = MixtureSampler(self.rows.domain, list(data_manifest["domains"]), weights,
                                          seed=self.tcfg.seed, rank=self.rank, world_size=self.world)
        module = DistillationModule(student, LossSpec.from_config(self.tcfg), self.tcfg.loss_chunk_size)
        self.module, self.optimizer = self._setup_model_and_optimizer(module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.start_step, self.tokens_seen = self._resume(checkpoint)

    def _setup_on_policy(self, student_hash: str, vocab_size: int, student_dir: Path) -> Any:
        """Objective "on_policy": the online teacher, the encoded prompts (each must leave room for
        `train.max_new_tokens` inside data.seq_len), their sampler, and with train.student_generation=vllm
        the student's engine on `student_dir`; see distill/on_policy.py."""

        backend, teacher_dir = _online_teacher(self.cfg, student_hash, vocab_size, self.accelerator.device)
        _, prompt_ids = encode_training_prompts(self.tcfg, self.tokenizer, context=self.rows.seq_len)
        eos_ids = eos_token_ids(teacher_dir)
        eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in eos_ids else min(eos_ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        engine = StudentVLLM(self.tcfg, student_dir, eos_ids=eos_ids, max_model_len=self.rows.seq_len) \
            if self.tcfg.student_generation == "vllm" else None
        self.on_policy = OnPolicyBatches(
            self.tcfg, prompt_ids, backend, OnlineTargets(backend, self.cfg.capture.top_k), pad_id=pad_id,
            eos_ids=eos_ids, eos_id=eos_id, last_checkpoint=lambda: latest_checkpoint(self.out_dir),
            student_engine=engine)
        return PromptSampler(len(prompt_ids), self.tcfg.seed, rank=self.rank, world_size=self.world)

    def _setup_model_and_optimizer(self, module: DistillationModule) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module sharded (FSDP) or wrapped (DDP), and AdamW over its parameters: weight decay on the
        matrices only. Under FSDP the optimizer is built after sharding, so its state is sharded too."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            module.to(self.accelerator.device)
            for layer in module.student.get_decoder().layers:
                fully_shard(layer)
            fully_shard(module)
            return module, self._optimizer(module)
        return self.accelerator.prepare(module, self._optimizer(module))

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for param in module.parameters():
            (decay if param.ndim >= 2 else no_decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.tcfg.lr, betas=tuple(self.tcfg.adam_betas), eps=self.tcfg.adam_eps,
        )

    def _resume(self, checkpoint: Path | None) -> tuple[int, int]:
        """Optimizer state, data position and RNG streams of `checkpoint`; returns (step, tokens seen)."""
        if checkpoint is None:
            return 0, 0
        state, optimizer_state = load_checkpoint(checkpoint)
        if (optimizer_state is None) != self.fsdp:
            saved = "fsdp" if optimizer_state is None else "ddp (or one process)"
            raise ArtifactError(f"{checkpoint}: saved with parallelism {saved}, but this run uses "
                                f"{'fsdp' if self.fsdp else 'ddp (or one process)'}; resume with the same "
                                f"train.parallelism and process count class, or delete {self.out_dir}")
        if self.fsdp:
            load_sharded_state(checkpoint, self.module, self.optimizer)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        saved_ranks = state["ranks"]
        # The sampler position is global (the same on every rank), so any process count can resume it;
        # per-process RNG streams only carry over to the same process count.
        self.sampler.load_state_dict(saved_ranks[min(self.rank, len(saved_ranks) - 1)]["sampler"])
        if len(saved_ranks) == self.world:
            restore_rng_state(saved_ranks[self.rank]["rng"])
        else:
            self.accelerator.print(f"train: {checkpoint} was saved by {len(saved_ranks)} processes, resuming on "
                                   f"{self.world}: data position kept, RNG streams reseeded")
        step = checkpoint_step(checkpoint)
        self.accelerator.print(f"train: resumed from {checkpoint} (step {step}/{self.num_steps})")
        return step, int(state.get("tokens", 0))

    # -- the loop ---------------------------------------------------------------------------------------

    def train(self, lr_at: Callable[[int], float], save_at: set[int]) -> None:
        from tqdm.auto import tqdm

        tcfg = self.tcfg
        periodic = set(range(tcfg.save_every, self.num_steps + 1, tcfg.save_every)) if tcfg.save_every > 0 else set()
        save_steps = periodic | {s for s in save_at if 0 < s <= self.num_steps} | {self.num_steps}
        self._open_logs()
        progress = tqdm(total=self.num_steps, initial=self.start_step, disable=not self.main, desc="train",
                        unit="step", dynamic_ncols=True)
        self.tokens_per_step = tcfg.batch_size * tcfg.grad_accum * self.world * self.rows.seq_len
        self.started, self.steps_done, self.tokens_this_run = time.perf_counter(), 0, 0
        try:
            for step in range(self.start_step, self.num_steps):
                record = self._train_step(step, lr_at(step))
                self._log(record, progress)
                if record["step"] in save_steps:
                    self._save(record["step"], record["lr"], protected=set(save_at))
        finally:
            progress.close()
            self._close_logs()

    def _train_step(self, step: int, lr: float) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches per process; returns its metrics record."""
        tcfg, accelerator = self.tcfg, self.accelerator
        if self.on_policy is not None:
            student = self._unwrapped_student()
            micro = [self.on_policy.micro_batch(student, self.sampler, step, accelerator.device)
                     for _ in range(tcfg.grad_accum)]
        else:
            micro = [make_micro_batch(self.rows, self.sampler.take(tcfg.batch_size), self.targets,
                                      accelerator.device) for _ in range(tcfg.grad_accum)]
        local_count = torch.tensor(float(sum(m.num_positions for m in micro)), device=accelerator.device)
        global_count = float(accelerator.reduce(local_count, reduction="sum").item())
        # Every position of the global batch weighs 1/count; × world undoes the gradient averaging of
        # DDP's all-reduce and FSDP's reduce-scatter.
        position_weight = 1.0 / max(global_count, 1.0)
        sums = torch.zeros(3, device=accelerator.device)
        self.module.train()
        for i, batch in enumerate(micro):
            with self._grad_sync(i == len(micro) - 1), self._autocast():
                out = self.module(batch, position_weight)
                accelerator.backward(out.loss * self.world)
            sums += torch.stack([out.loss.detach(), out.kd.detach(), out.ce.detach()])
        loss, kd, ce = (float(v) for v in accelerator.reduce(sums, reduction="sum"))
        if not math.isfinite(loss):
            raise NonFiniteLossError(_nonfinite_message("loss", loss, step, kd, ce, self.out_dir))
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm) and tcfg.mixed_precision != "fp16":
            # (fp16's loss scaler expects occasional overflows and skips those steps itself.)
            raise NonFiniteLossError(_nonfinite_message("gradient norm", grad_norm, step, kd, ce, self.out_dir))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        # On-policy rows have no fixed length: count the teacher-scored completion tokens.
        step_tokens = int(global_count) if self.on_policy is not None else self.tokens_per_step
        self.tokens_seen += step_tokens
        self.tokens_this_run += step_tokens
        elapsed = time.perf_counter() - self.started
        record = {"step": step + 1, "loss": loss, "kd": kd, "ce": ce, "lr": lr, "grad_norm": grad_norm,
                  "positions": int(global_count), "tokens": self.tokens_seen,
                  "tokens_per_s": round(self.tokens_this_run / max(elapsed, 1e-9), 1)}
        if self.on_policy is not None:  # this process's share of the step
            stats = self.on_policy.take_stats()
            record.update(student_samples=stats.student_samples, teacher_samples=stats.teacher_samples,
                          sample_s=round(stats.sample_s, 3), score_s=round(stats.score_s, 3))
        return record

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across processes on the last micro-batch of a step only."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.module)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # accelerate.prepare puts autocast into the DDP module's forward; the FSDP module is not prepared.
        return self.accelerator.autocast() if self.fsdp else contextlib.nullcontext()

    def _clip_gradients(self) -> float:
        """Clip to `train.max_grad_norm` (0: no clipping); returns the global gradient norm before clipping."""
        max_norm = self.tcfg.max_grad_norm
        if self.fsdp:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(self.params, max_norm))
        return float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))

    # -- logging and checkpoints ------------------------------------------------------------------------

    def _open_logs(self) -> None:
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE, self.start_step) if self.main else None
        self.writer = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"),
                                        purge_step=self.start_step + 1 if self.start_step else None)

    def _close_logs(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()

    def _log(self, record: dict[str, Any], progress: Any) -> None:
        """JSONL every step; progress bar and TensorBoard every `log_every` steps (main process)."""
        if not self.main:
            return
        self.metrics.write(record)
        progress.update(1)
        done = record["step"]
        if done % self.tcfg.log_every == 0 or done == self.num_steps:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            for key in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], done)

    def _student_state(self) -> dict[str, torch.Tensor]:
        """The full student state dict (gathered from every process under FSDP; on the main process)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        else:
            state = self.accelerator.get_state_dict(self.module)
        return {k.removeprefix("student."): v.detach().cpu() for k, v in state.items()}

    def _save(self, step: int, lr: float, protected: set[int]) -> None:
        """Checkpoint from every process: the weights gathered, the sharded state (FSDP) written by each,
        the per-rank data position and RNG states collected; the main process completes the folder."""
        from accelerate.utils import gather_object

        accelerator = self.accelerator
        staging = staging_dir(self.out_dir, step)
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        accelerator.wait_for_everyone()
        if self.fsdp:
            save_sharded_state(staging, self.module, self.optimizer)
        student_state = self._student_state()
        ranks = gather_object([{"sampler": self.sampler.state_dict(), "rng": capture_rng_state()}])
        optimizer_state = None if self.fsdp else self.optimizer.state_dict()
        if self.main:
            save_checkpoint(self.out_dir, step, model_state=student_state, model=self._unwrapped_student(),
                            optimizer_state=optimizer_state,
                            state={"num_steps": self.num_steps, "lr": lr, "tokens": self.tokens_seen,
                                   "world_size": self.world, "parallelism": self.tcfg.parallelism,
                                   "ranks": ranks})
            prune_checkpoints(self.out_dir, self.tcfg.keep_last, protected=protected)
        accelerator.wait_for_everyone()

    def _unwrapped_student(self) -> nn.Module:
        return (self.module if self.fsdp else self.accelerator.unwrap_model(self.module)).student

    def export(self) -> None:
        """`out_dir/final`: the trained student with its tokenizer (an HF folder), and the loss plot."""
        student_state = self._student_state()
        if self.main:
            with atomic_dir(self.out_dir / "final") as tmp:
                self._unwrapped_student().save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            plot_losses(self.out_dir / METRICS_FILE, self.out_dir / "loss.png")
        self.accelerator.wait_for_everyone()


def cpu_only() -> bool:
    """Several processes on a host without an accelerator: train on CPU over gloo. accelerate only infers
    that from `--cpu`, whose launcher needs MPI for more than one process; this also covers
    `accelerate launch --multi_gpu --num_processes N` and `torchrun` on a CPU-only host."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _nonfinite_message(what: str, value: float, step: int, kd: float, ce: float, out_dir: Path) -> str:
    last = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
    return (f"train step {step + 1}: {what} is {value} (kd={kd}, ce={ce}); stopped before the optimizer step — "
            f"{kept}. Try a lower train.lr, train.max_grad_norm > 0, or train.mixed_precision=no")


# ---------------------------------------------------------------------------------------------------
# The `train` stage
# ---------------------------------------------------------------------------------------------------


def default_num_steps(cfg: RunConfig, num_rows: int, world_size: int) -> int:
    """`train.max_steps`, or (0) the steps of one pass over the training rows at the global batch size."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    return max(1, num_rows // global_batch)


def train(cfg: RunConfig, run_dir: Path) -> Path:
    """The `train` stage: `RUN/student_init` → `RUN/train` (checkpoints/, final/, metrics.jsonl, tb/,
    loss.png, manifest). Resumes from the newest checkpoint; returns at once if the stage is complete."""
    from accelerate import PartialState


    run_dir = Path(run_dir)
    out_dir = run_dir / "train"
    if is_complete(out_dir, "train"):
        return out_dir
    init_dir = run_dir / "student_init"
    init_manifest = read_manifest(init_dir, "student")
    data_dir = run_dir / "data"
    data_manifest = read_manifest(data_dir, "data")
    state = PartialState(cpu=cpu_only())
    num_steps = default_num_steps(cfg, int(data_manifest["num_train"]), state.num_processes)
    weights = domain_weights(cfg, data_manifest)
    run_training(cfg, run_dir, out_dir=out_dir, init_from=init_dir, weights=weights, num_steps=num_steps,
                 lr_at=schedule_from_config(cfg.train, num_steps), save_at=set())
    if state.is_main_process:
        inputs = {"data": data_dir, "student_init": init_dir}
        if cfg.train.reads_logit_store:
            inputs["logits"] = run_dir / "logits"
        write_manifest(out_dir, "train", config=to_dict(cfg.train), teacher=init_manifest.get("teacher"),
                       inputs=inputs, num_steps=num_steps, weights=weights, world_size=state.num_processes,
                       final="final")
    state.wait_for_everyone()
    return out_dir


if __name__ == "__main__":  # `python -m distill.trainer CONFIG RUN_DIR [key=value ...]`, see distill.pipeline.launch
    from distill.pipeline import launch

    sys.exit(launch(sys.argv[1:]))
