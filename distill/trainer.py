"""The `train` stage: distil the teacher into the student with one readable training loop on `accelerate`.

`run_training` is the loop (also used by the annealing stage); `train` wires it to a run directory.
One optimizer step:

1. Draw `grad_accum` micro-batches of `batch_size` packed rows per process from the mixture sampler.
2. Find the training positions: position t trains on token t+1 iff `loss_mask[t+1] = 1` and token t+1 is not
   the first token of a new document (`position_ids[t+1] ≠ 0`), so no loss ever crosses a document boundary.
3. Teacher targets for those positions: the offline logit store (`teachers.store.LogitStore`), or an online
   teacher (`teachers.backend.make_backend`) scoring the same rows in-process — both give the same top-k record,
   so the loss code path is identical.
4. Student forward with a block-diagonal document mask (`distill.packing.document_causal_mask`), then the
   chunked loss (`distill.losses.chunked_loss`) on the final hidden states: no `[B, L, V]` fp32 logits.
5. Every position of the *global* batch (all micro-batches, all processes) has the same weight, so the loss
   and gradient equal those of one big batch whatever the process count or accumulation.
6. Non-finite loss or gradient norm → `NonFiniteLossError` before the optimizer step (no checkpoint is
   written, the last good one stays); else clip, set the LR from `lr_at(step)`, step.
7. Log (JSONL every step, console/TensorBoard every `log_every`), checkpoint at the chosen steps.

Launch on several processes with `accelerate launch --multi_gpu --num_processes N -m distill.trainer CONFIG
RUN_DIR` (DDP; on a host without GPUs it runs on CPU over gloo), or FSDP through an accelerate config file —
the code is the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    check_compatible,
    is_complete,
    read_manifest,
    tokenizer_hash,
    write_manifest,
)
from distill.checkpoint import (
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from distill.config import RunConfig, to_dict
from distill.losses import LossSpec, LossSums, TopK, chunked_loss
from distill.packing import document_causal_mask
from distill.schedule import schedule_from_config

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/inf loss or gradient; training stopped before the optimizer step."""


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One micro-batch of `B` packed rows of `L` tokens, on the training device.

    `select` int64 `[N]`: flat indices (into `B·L`) of the training positions; `labels` int64 `[N]`: their next
    tokens; `target`: the teacher's top-k at those positions (None for the "ce" objective).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    select: torch.Tensor
    labels: torch.Tensor
    target: TopK | None

    @property
    def num_positions(self) -> int:
        return int(self.select.numel())


def training_positions(input_ids: torch.Tensor, position_ids: torch.Tensor,
                       loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` rows → `(select, labels)`: flat indices `[N]` of positions t whose next token is a target
    inside the same document, and those next tokens `[N]`."""
    batch, length = input_ids.shape
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[:, :-1] = (loss_mask[:, 1:] != 0) & (position_ids[:, 1:] != 0)
    select = valid.reshape(-1).nonzero().squeeze(-1)
    next_ids = torch.zeros_like(input_ids)
    next_ids[:, :-1] = input_ids[:, 1:]
    return select, next_ids.reshape(-1)[select]


class TrainRows:
    """The packed training rows of `RUN/data/train.safetensors` (see docs/ARCHITECTURE.md), in memory."""

    def __init__(self, data_dir: Path) -> None:
        from distill.data import load_split

        arrays = load_split(data_dir, "train")
        for name in ("input_ids", "position_ids", "loss_mask", "domain"):
            if name not in arrays:
                raise ArtifactError(f"{data_dir / 'train.safetensors'}: missing tensor {name!r}")
        self.input_ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))
        self.position_ids = torch.from_numpy(arrays["position_ids"].astype(np.int64))
        self.loss_mask = torch.from_numpy(arrays["loss_mask"].astype(np.int64))
        self.domain = arrays["domain"].astype(np.int64)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


class OfflineTargets:
    """Teacher targets read from the logit store (`RUN/logits/`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __call__(self, indices: np.ndarray, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 select: torch.Tensor) -> TopK:
        ids, logprobs, tail = self.store.batch(indices)
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        logprobs = torch.as_tensor(np.asarray(logprobs), dtype=torch.float32)
        tail = torch.as_tensor(np.asarray(tail), dtype=torch.float32)
        k = ids.shape[-1]
        return TopK(ids.reshape(-1, k), logprobs.reshape(-1, k), tail.reshape(-1)).select(select)


class OnlineTargets:
    """Teacher targets computed on the fly by a teacher backend held in this process (small teachers)."""

    def __init__(self, backend: Any, k: int) -> None:
        self.backend = backend
        self.k = k

    def __call__(self, indices: np.ndarray, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 select: torch.Tensor) -> TopK:
        rows = self.backend.score(input_ids, position_ids, self.k)
        ids = torch.cat([r.ids.reshape(-1, self.k) for r in rows]).to(torch.int64).cpu()
        logprobs = torch.cat([r.logprobs.reshape(-1, self.k) for r in rows]).float().cpu()
        tail = torch.cat([r.tail_logmass.reshape(-1) for r in rows]).float().cpu()
        return TopK(ids, logprobs, tail).select(select)


TargetSource = Callable[[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor], TopK]


def make_micro_batch(rows: TrainRows, indices: np.ndarray, targets: TargetSource | None,
                     device: torch.device) -> MicroBatch:
    index = torch.as_tensor(indices, dtype=torch.int64)
    input_ids, position_ids = rows.input_ids[index], rows.position_ids[index]
    select, labels = training_positions(input_ids, position_ids, rows.loss_mask[index])
    target = targets(indices, input_ids, position_ids, select) if targets is not None else None
    if target is not None:
        target = TopK(*(t.to(device) for t in target))
    return MicroBatch(input_ids.to(device), position_ids.to(device), select.to(device), labels.to(device),
                      target)


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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# The reusable training phase
# ---------------------------------------------------------------------------------------------------


def _student_tokenizer_dir(run_dir: Path, init_from: Path) -> Path:
    if (init_from / "tokenizer_config.json").is_file():
        return init_from
    return run_dir / "student_init"


def _make_targets(cfg: RunConfig, run_dir: Path, student_hash: str, vocab_size: int,
                  num_rows: int, device: torch.device) -> TargetSource | None:
    """The teacher-target source for objective "kd", after refusing an incompatible store or teacher."""
    if cfg.train.objective == "ce":
        return None
    if cfg.train.teacher_source == "offline":
        from teachers.store import LogitStore

        logits_dir = run_dir / "logits"
        store = LogitStore(logits_dir)
        check_compatible(store.manifest, tokenizer_hash=student_hash, vocab_size=vocab_size, where=logits_dir)
        if len(store) < num_rows:
            raise ArtifactError(f"{logits_dir}: holds {len(store)} sequences but data/ has {num_rows} train rows")
        return OfflineTargets(store)
    from teachers.backend import make_backend
    from teachers.resolve import load_tokenizer, resolve_teacher

    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    teacher_vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    identity = {"tokenizer_hash": tokenizer_hash(load_tokenizer(teacher_dir)), "vocab_size": teacher_vocab}
    check_compatible({"teacher": identity}, tokenizer_hash=student_hash, vocab_size=vocab_size,
                     where=f"teacher {cfg.teacher.model}")
    teacher_cfg = cfg.teacher
    if teacher_cfg.backend == "transformers" and teacher_cfg.device == "auto":
        # The online teacher lives next to this process's student (its own GPU under DDP).
        teacher_cfg = type(teacher_cfg)(**{**to_dict(teacher_cfg), "device": str(device)})
    return OnlineTargets(make_backend(teacher_cfg, teacher_dir), cfg.capture.top_k)


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.mixture import MixtureSampler

    tcfg = cfg.train
    run_dir, out_dir, init_from = Path(run_dir), Path(out_dir), Path(init_from)
    if num_steps <= 0:
        raise ValueError(f"run_training: num_steps must be > 0, got {num_steps}")
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=_cpu_only())
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(tcfg.seed)

    checkpoint = latest_checkpoint(out_dir) if resume else None
    start_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    if start_step > num_steps:
        raise ArtifactError(f"{checkpoint}: is past num_steps={num_steps}; was the config changed? "
                            f"Delete {out_dir} to start over")
    final_dir = out_dir / "final"
    if start_step == num_steps and (final_dir / "config.json").is_file():
        return out_dir

    tokenizer_dir = _student_tokenizer_dir(run_dir, init_from)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    student = AutoModelForCausalLM.from_pretrained(checkpoint or init_from, dtype=torch.float32)
    vocab_size = int(student.config.vocab_size)
    student_hash = tokenizer_hash(tokenizer)
    data_dir = run_dir / "data"
    data_manifest = read_manifest(data_dir, "data")
    check_compatible(data_manifest, tokenizer_hash=student_hash, vocab_size=vocab_size, where=data_dir)
    rows = TrainRows(data_dir)
    targets = _make_targets(cfg, run_dir, student_hash, vocab_size, len(rows), accelerator.device)

    sampler = MixtureSampler(rows.domain, list(data_manifest["domains"]), weights, seed=tcfg.seed,
                             rank=rank, world_size=world)
    decay, no_decay = [], []
    for param in student.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_at(min(start_step, num_steps - 1)), betas=(0.9, 0.95), eps=1e-8,
    )
    module = DistillationModule(student, LossSpec.from_config(tcfg), tcfg.loss_chunk_size)
    module, optimizer = accelerator.prepare(module, optimizer)

    tokens_seen = 0
    if checkpoint is not None:
        state, optimizer_state = load_checkpoint(checkpoint)
        optimizer.load_state_dict(optimizer_state)
        saved_ranks = state["ranks"]
        # The sampler position is global (the same on every rank), so any process count can resume it;
        # per-process RNG streams only carry over to the same process count.
        sampler.load_state_dict(saved_ranks[min(rank, len(saved_ranks) - 1)]["sampler"])
        if len(saved_ranks) == world:
            restore_rng_state(saved_ranks[rank]["rng"])
        else:
            accelerator.print(f"train: {checkpoint} was saved by {len(saved_ranks)} processes, resuming on "
                              f"{world}: data position kept, RNG streams reseeded")
        tokens_seen = int(state.get("tokens", 0))
        accelerator.print(f"train: resumed from {checkpoint} (step {start_step}/{num_steps})")

    periodic = set(range(tcfg.save_every, num_steps + 1, tcfg.save_every)) if tcfg.save_every > 0 else set()
    save_steps = periodic | {s for s in save_at if 0 < s <= num_steps} | {num_steps}
    metrics = MetricsLog(out_dir / METRICS_FILE, start_step) if main else None
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
    progress = tqdm(total=num_steps, initial=start_step, disable=not main, desc="train", unit="step",
                    dynamic_ncols=True)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * world * rows.seq_len
    started, steps_done = time.perf_counter(), 0
    params = [p for p in module.parameters() if p.requires_grad]

    try:
        for step in range(start_step, num_steps):
            micro = []
            for _ in range(tcfg.grad_accum):
                micro.append(make_micro_batch(rows, sampler.take(tcfg.batch_size), targets, accelerator.device))
            local_count = torch.tensor(float(sum(m.num_positions for m in micro)), device=accelerator.device)
            global_count = float(accelerator.reduce(local_count, reduction="sum").item())
            # Every position of the global batch weighs 1/count; × world undoes DDP's gradient averaging.
            position_weight = 1.0 / max(global_count, 1.0)
            sums = torch.zeros(3, device=accelerator.device)
            module.train()
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                    out = module(batch, position_weight)
                    accelerator.backward(out.loss * world)
                sums += torch.stack([out.loss.detach(), out.kd.detach(), out.ce.detach()])
            loss, kd, ce = (float(v) for v in accelerator.reduce(sums, reduction="sum"))
            if not math.isfinite(loss):
                raise NonFiniteLossError(_nonfinite_message("loss", loss, step, kd, ce, out_dir))
            if tcfg.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, tcfg.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not math.isfinite(grad_norm) and tcfg.mixed_precision != "fp16":
                # (fp16's loss scaler expects occasional overflows and skips those steps itself.)
                raise NonFiniteLossError(_nonfinite_message("gradient norm", grad_norm, step, kd, ce, out_dir))
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            steps_done += 1
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - started
            record = {"step": done, "loss": loss, "kd": kd, "ce": ce, "lr": lr, "grad_norm": grad_norm,
                      "positions": int(global_count), "tokens": tokens_seen,
                      "tokens_per_s": round(steps_done * tokens_per_step / max(elapsed, 1e-9), 1)}
            if main:
                metrics.write(record)
                progress.update(1)
                if done % tcfg.log_every == 0 or done == num_steps:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                    for key in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"):
                        writer.add_scalar(f"train/{key}", record[key], done)
            if done in save_steps:
                _save(accelerator, module, optimizer, sampler, out_dir, done, num_steps, lr, tokens_seen, world)
                if main:
                    prune_checkpoints(out_dir, tcfg.keep_last, protected=set(save_at))
                accelerator.wait_for_everyone()
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()

    state_dict = accelerator.get_state_dict(module)
    if main:
        student_state = {k.removeprefix("student."): v for k, v in state_dict.items()}
        unwrapped = accelerator.unwrap_model(module).student
        with atomic_dir(final_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        plot_losses(out_dir / METRICS_FILE, out_dir / "loss.png")
    accelerator.wait_for_everyone()
    return out_dir


def _cpu_only() -> bool:
    """Several processes on a host without an accelerator: train on CPU over gloo. accelerate only infers
    that from `--cpu`, whose launcher needs MPI for more than one process; this also covers
    `accelerate launch --multi_gpu --num_processes N` and `torchrun` on a CPU-only host."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _nonfinite_message(what: str, value: float, step: int, kd: float, ce: float, out_dir: Path) -> str:
    last = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
    return (f"train step {step + 1}: {what} is {value} (kd={kd}, ce={ce}); stopped before the optimizer step — "
            f"{kept}. Try a lower train.lr, train.max_grad_norm > 0, or train.mixed_precision=no")


def _save(accelerator, module, optimizer, sampler, out_dir: Path, step: int, num_steps: int, lr: float,
          tokens: int, world: int) -> None:
    """Checkpoint from every process: the weights are gathered (FSDP), the per-rank data position and RNG
    states collected; the main process writes the folder."""
    from accelerate.utils import gather_object

    state_dict = accelerator.get_state_dict(module)
    ranks = gather_object([{"sampler": sampler.state_dict(), "rng": capture_rng_state()}])
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        student_state = {k.removeprefix("student."): v.detach().cpu() for k, v in state_dict.items()}
        save_checkpoint(out_dir, step, model_state=student_state,
                        model=accelerator.unwrap_model(module).student, optimizer_state=optimizer_state,
                        state={"num_steps": num_steps, "lr": lr, "tokens": tokens, "world_size": world,
                               "ranks": ranks})


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

    from distill.mixture import domain_weights

    run_dir = Path(run_dir)
    out_dir = run_dir / "train"
    if is_complete(out_dir, "train"):
        return out_dir
    init_dir = run_dir / "student_init"
    init_manifest = read_manifest(init_dir, "student")
    data_dir = run_dir / "data"
    data_manifest = read_manifest(data_dir, "data")
    state = PartialState(cpu=_cpu_only())
    num_steps = default_num_steps(cfg, int(data_manifest["num_train"]), state.num_processes)
    weights = domain_weights(cfg, data_manifest)
    run_training(cfg, run_dir, out_dir=out_dir, init_from=init_dir, weights=weights, num_steps=num_steps,
                 lr_at=schedule_from_config(cfg.train, num_steps), save_at=set())
    if state.is_main_process:
        inputs = {"data": data_dir, "student_init": init_dir}
        if cfg.train.objective == "kd" and cfg.train.teacher_source == "offline":
            inputs["logits"] = run_dir / "logits"
        write_manifest(out_dir, "train", config=to_dict(cfg.train), teacher=init_manifest.get("teacher"),
                       inputs=inputs, num_steps=num_steps, weights=weights, world_size=state.num_processes,
                       final="final")
    state.wait_for_everyone()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m distill.trainer CONFIG RUN_DIR [key=value ...]` — the train stage, for `accelerate launch`."""
    from distill.config import load_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m distill.trainer CONFIG RUN_DIR [section.key=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(args[0], args[2:])
    print(train(cfg, Path(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
