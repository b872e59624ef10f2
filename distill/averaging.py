"""Checkpoint averaging: the (weighted) mean of several saved models, written as a normal HF folder.

Llama 3 averages the checkpoints saved during annealing into the final model. Averaging is only meaningful
for checkpoints of one run (same architecture, close in weight space), so every input must have the same
model config and the same tensor names, shapes and dtypes as the first; anything else is refused naming the
offending path. The mean is accumulated in float64 one checkpoint at a time (memory: two copies of the
model in float64, whatever the number of checkpoints) and cast back to each tensor's dtype.

The output folder holds `model.safetensors`, `config.json` (+ `generation_config.json`) and the tokenizer
files of the first input that has them (trainer checkpoints have none: pass `tokenizer_from`), plus
`averaged_from.json` recording the inputs and their weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.artifacts import TOKENIZER_FILES, atomic_dir, atomic_write_json

# Config keys that record how or where a model was saved, not what it computes.
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


class AveragingError(ValueError):
    """The checkpoints cannot be averaged (missing, or not from the same architecture)."""


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder (single file or sharded with an index)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    raise AveragingError(f"{folder}: no model.safetensors (or sharded index) — not a saved model folder")


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def _model_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise AveragingError(f"{path}: missing — not a saved model folder")
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in _CONFIG_IGNORED}


def _check_same(reference: Path, ref_cfg: dict, ref_state: dict[str, torch.Tensor], path: Path,
                cfg: dict, state: dict[str, torch.Tensor]) -> None:
    if cfg != ref_cfg:
        diff = sorted(k for k in set(cfg) | set(ref_cfg) if cfg.get(k) != ref_cfg.get(k))
        shown = ", ".join(f"{k}: {ref_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in diff[:4])
        raise AveragingError(f"{path}: config differs from {reference} ({shown}); only checkpoints of one "
                             "model can be averaged")
    if set(state) != set(ref_state):
        extra, missing = sorted(set(state) - set(ref_state)), sorted(set(ref_state) - set(state))
        raise AveragingError(f"{path}: tensor names differ from {reference} (extra {extra[:3]}, missing {missing[:3]})")
    for key, tensor in state.items():
        ref = ref_state[key]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise AveragingError(f"{path}: tensor {key} is {tuple(tensor.shape)} {tensor.dtype}, but "
                                 f"{tuple(ref.shape)} {ref.dtype} in {reference}")


def ema_weights(num: int, decay: float) -> list[float]:
    """Weights of `num` checkpoints (oldest first) for an exponential moving average with `decay` per
    checkpoint, bias-corrected to sum to 1: w_k ∝ decay^(num−1−k). decay = 0 keeps only the last one."""
    if num < 1:
        raise ValueError(f"ema_weights: need at least one checkpoint, got {num}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_weights: decay must be in [0, 1), got {decay}")
    raw = [decay ** (num - 1 - k) for k in range(num)]
    total = sum(raw)
    return [w / total for w in raw]


def average_checkpoints(paths: list[Path], out_dir: Path, *, weights: list[float] | None = None,
                        tokenizer_from: Path | None = None) -> Path:
    """Average the models in `paths` (HF folders or trainer checkpoints) into the HF folder `out_dir`.

    `weights` (default uniform) must be non-negative with a positive sum; they are normalised. Config and
    generation config are copied from the first path; tokenizer files from `tokenizer_from`, else from the
    first path that has them. Returns `out_dir` (written atomically).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise AveragingError("average: no checkpoints given")
    for path in paths:
        if not path.is_dir():
            raise AveragingError(f"{path}: not a folder")
    if weights is None:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AveragingError(f"average: weights {weights} must be {len(paths)} non-negative numbers with a "
                             "positive sum")
    norm = [w / sum(weights) for w in weights]

    reference = paths[0]
    ref_cfg = _model_config(reference)
    ref_state = _load_state(reference)
    total = {k: v.to(torch.float64) * norm[0] if v.is_floating_point() else v.clone() for k, v in ref_state.items()}
    for path, w in zip(paths[1:], norm[1:], strict=True):
        state = _load_state(path)
        _check_same(reference, ref_cfg, ref_state, path, _model_config(path), state)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                total[key] += tensor.to(torch.float64) * w
            elif not torch.equal(tensor, ref_state[key]):
                raise AveragingError(f"{path}: integer tensor {key} differs from {reference}; cannot average it")
    averaged = {k: v.to(ref_state[k].dtype).contiguous() for k, v in total.items()}

    tok_source = Path(tokenizer_from) if tokenizer_from is not None else next(
        (p for p in paths if any((p / f).is_file() for f in TOKENIZER_FILES)), None)
    if tok_source is None:
        print(f"average: no tokenizer files in {paths[0]} or the other inputs; {out_dir} will have none "
              "(pass tokenizer_from)", file=sys.stderr)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(reference / "config.json", tmp / "config.json")
        if (reference / "generation_config.json").is_file():
            shutil.copy2(reference / "generation_config.json", tmp / "generation_config.json")
        if tok_source is not None:
            for name in TOKENIZER_FILES:
                if (tok_source / name).is_file():
                    shutil.copy2(tok_source / name, tmp / name)
        atomic_write_json(tmp / "averaged_from.json", {
            "checkpoints": [str(p) for p in paths], "weights": norm,
            "tokenizer_from": str(tok_source) if tok_source is not None else None,
        })
    return out_dir
