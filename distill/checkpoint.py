"""Training checkpoints: atomic, prunable, and complete enough to resume bit-for-bit.

Layout: `out_dir/checkpoints/step-XXXXXX/` (XXXXXX = optimizer steps completed) holding
- `model.safetensors` + `config.json` (+ `generation_config.json`): `save_pretrained`, so the folder loads with
  `AutoModelForCausalLM.from_pretrained` (the annealing stage averages such folders);
- `optimizer.pt`: the optimizer's `state_dict()` (AdamW moments, step counts, param-group hyper-parameters);
- `trainer_state.json`: `step`, `num_steps`, `lr`, `tokens`, and per process (rank) the data position
  (`sampler`: the mixture sampler's state) and the RNG states (python, numpy, torch, cuda). The LR schedule
  is a pure function of the step, so the step is the scheduler's whole state.

A checkpoint is written into a temp folder and renamed into place (`distill.artifacts.atomic_dir`), so a
`step-*` folder is either complete or absent — a `kill -9` during a save leaves the previous checkpoint.
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

from distill.artifacts import ArtifactError, atomic_dir, atomic_write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
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


def save_checkpoint(out_dir: Path, step: int, *, model_state: dict[str, torch.Tensor], model: Any,
                    optimizer_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write `out_dir/checkpoints/step-{step}` atomically and return it.

    `model` is the unwrapped HF model (its `save_pretrained` writes config + weights), `model_state` the full
    state dict to save (from `accelerator.get_state_dict`, so it is gathered under FSDP), `optimizer_state`
    the optimizer's state dict, `state` the JSON trainer state (`step` is set here).
    """
    path = checkpoint_dir(out_dir, step)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        atomic_write_json(tmp / STATE_FILE, _jsonable({**state, "step": step}))
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(trainer_state, optimizer_state)` of a checkpoint folder; the weights are loaded by
    `from_pretrained(path)`. Raises ArtifactError naming the file when something is missing or corrupt."""
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{state_path}: unreadable trainer state ({err})") from None
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
