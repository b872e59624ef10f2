"""Result cache: a task's result is stored under the hash of the model folder and the task's cache key,
so re-evaluating an unchanged model is a file read.

Layout: `$DISTILL_CACHE/eval/results/<model_hash>/<task>-<key_hash>.json`. Hashing a folder reads every
weight file once; the digest is memoised in `$DISTILL_CACHE/eval/folder_hashes.json` against each file's
size and mtime, so an unchanged folder is not read again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.artifacts import TOKENIZER_FILES, atomic_write_json, cache_root, sha256_file, sha256_json, tokenizer_folder

# What decides a model's outputs: weights, config, tokenizer. Not README/model card/manifests.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")
_IGNORED = {"manifest.json", "README.md", "trainer_state.json"}


def eval_cache_dir() -> Path:
    return cache_root() / "eval"


def _model_files(folder: Path, tokenizer_path: Path | None) -> list[Path]:
    """The weight and config files of `folder`, then the tokenizer files the model is evaluated with."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES
                   and p.name not in _IGNORED and p.name not in TOKENIZER_FILES)
    if not any(p.name == "config.json" for p in files):
        raise FileNotFoundError(f"{folder}: no config.json — not a Hugging Face model folder")
    tokenizer_dir = tokenizer_folder(folder, tokenizer_path)
    return files + sorted(tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file())


def model_hash(folder: Path, tokenizer_path: Path | None = None) -> str:
    """A 16-hex-digit digest of what decides a model's outputs: the weights and config in `folder` and the
    tokenizer it is evaluated with (its own, else the one in `tokenizer_path`, as `EvalModel` loads it).
    A training checkpoint (no tokenizer) read with the final student's tokenizer and the final folder that
    holds the same weights therefore hash alike, and the second one's results are read from the cache."""
    folder = Path(folder).resolve()
    files = _model_files(folder, Path(tokenizer_path).resolve() if tokenizer_path is not None else None)
    stamp = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    memo_path = eval_cache_dir() / "folder_hashes.json"
    memo: dict[str, Any] = {}
    if memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except json.JSONDecodeError:
            memo = {}  # a corrupt memo only costs a re-hash
    # one entry per (folder, tokenizer read with it): a checkpoint hashed both ways is not re-read each time
    memo_key = str(folder) if tokenizer_path is None else f"{folder} with {Path(tokenizer_path).resolve()}"
    entry = memo.get(memo_key)
    if entry and entry.get("stamp") == stamp:
        return entry["hash"]
    digest = sha256_json({p.name: sha256_file(p) for p in files})[:16]
    memo[memo_key] = {"stamp": stamp, "hash": digest}
    atomic_write_json(memo_path, memo)
    return digest


# Bump when the stored result layout changes: older entries then miss instead of failing.
RESULT_FORMAT = 3  # 3: results carry per-unit sums (standard errors)


def _result_path(model_digest: str, key: dict[str, Any]) -> Path:
    digest = sha256_json({"format": RESULT_FORMAT, **key})[:16]
    return eval_cache_dir() / "results" / model_digest / f"{key['task']}-{digest}.json"


def load_result(model_digest: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached result of one task for one model, or None."""
    path = _result_path(model_digest, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("key") == key else None


def save_result(model_digest: str, key: dict[str, Any], result: dict[str, Any]) -> None:
    atomic_write_json(_result_path(model_digest, key), {"key": key, **result})
