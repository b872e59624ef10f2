"""Training checkpoints: atomic, prunable, and complete enough to resume bit-for-bit.

Layout: `out_dir/checkpoints/step-XXXXXX/` (XXXXXX = optimizer steps completed) holding
- `model.safetensors` + `config.json` (+ `generation_config.json`): `save_pretrained`, so the folder loads with
  `AutoModelForCausalLM.from_pretrained` (the annealing stage averages such folders);
- `optimizer.pt`: the optimizer's `state_dict()` (AdamW moments, step counts, param-group hyper-parameters)
  under DDP or one process; under FSDP instead `dcp/`: the sharded model and optimizer state written by every
  process with `torch.distributed.checkpoint` (one `__R_0.distcp` file per rank + `.metadata`), which
  resumes on the same or another number of processes;
- `trainer_state.json`: `step`, `num_steps`, `lr`, `tokens`, and per process (rank) the data position
  (`sampler`: the mixture sampler's state) and the RNG states (python, numpy, torch, cuda). The LR schedule
  is a pure function of the step, so the step is the scheduler's whole state.

A checkpoint is written into a staging folder (`.step-XXXXXX.partial`, the same path on every process, so
the FSDP ranks can write their shards into it) and renamed into place by the main process, so a `step-*`
folder is either complete or absent — a `kill -9` during a save leaves the previous checkpoint.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.artifacts import ArtifactError, atomic_write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "dcp"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ArtifactError(f"{path}: not a checkpoint folder (expected a name like step-000050)")
    return int(match.group(1))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir/checkpoints`, sorted by step (temp folders are ignored)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------------------------------
# RNG states as JSON
# ---------------------------------------------------------------------------------------------------


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and every CUDA device) as JSON-able data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _tensor_to_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_to_tensor(s) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    """Tuples, numpy scalars and arrays → plain JSON types (sampler and RNG states)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------------
# Save / load / prune
# ---------------------------------------------------------------------------------------------------


def staging_dir(out_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is assembled before `save_checkpoint` renames it into place."""
    return Path(out_dir) / CHECKPOINTS / f".step-{step:06d}.partial"


def save_checkpoint(out_dir: Path, step: int, *, model_state: dict[str, torch.Tensor], model: Any,
                    optimizer_state: dict[str, Any] | None, state: dict[str, Any]) -> Path:
    """Complete `staging_dir(out_dir, step)` and rename it to `out_dir/checkpoints/step-{step}`; main process.

    `model` is the unwrapped HF model (its `save_pretrained` writes config + weights), `model_state` the full
    state dict to save (gathered under FSDP), `optimizer_state` the optimizer's state dict (None when the
    sharded state is already in the staging folder's `dcp/`), `state` the JSON trainer state (`step` is set
    here).
    """
    staging, path = staging_dir(out_dir, step), checkpoint_dir(out_dir, step)
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, state_dict=model_state, safe_serialization=True)
    if optimizer_state is not None:
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
    atomic_write_json(staging / STATE_FILE, _jsonable({**state, "step": step}))
    old = path.with_name(f".{path.name}.old")
    if path.exists():  # the same step saved again: move the old one aside first, so one always exists
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_sharded_state(staging: Path, module: Any, optimizer: Any) -> None:
    """Every process: its shards of the FSDP model and optimizer state into `staging/dcp`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(Path(staging) / SHARDED_DIR))


def load_sharded_state(path: Path, module: Any, optimizer: Any) -> None:
    """Every process: restore the FSDP model and optimizer state of checkpoint `path` (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`(trainer_state, optimizer_state)` of a checkpoint folder; `optimizer_state` is None for a sharded
    (FSDP) checkpoint, restored with `load_sharded_state`. The weights are loaded by `from_pretrained(path)`.
    Raises ArtifactError naming the file when something is missing or corrupt."""
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{state_path}: unreadable trainer state ({err})") from None
    if (path / SHARDED_DIR / ".metadata").is_file():
        return state, None
    opt_path = path / OPTIMIZER_FILE
    if not opt_path.is_file():
        raise ArtifactError(f"{opt_path}: missing optimizer state")
    optimizer_state = torch.load(opt_path, map_location="cpu", weights_only=True)
    return state, optimizer_state


def prune_checkpoints(out_dir: Path, keep_last: int, protected: set[int]) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never one whose step is in `protected`
    (and never the newest). Returns the deleted folders."""
    periodic = [p for p in list_checkpoints(out_dir) if checkpoint_step(p) not in protected]
    keep = max(1, keep_last)
    doomed = periodic[:-keep] if len(periodic) > keep else []
    for path in doomed:
        # Rename first so a crash mid-delete never leaves a half checkpoint that looks complete.
        trash = path.with_name(f".{path.name}.deleting")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
