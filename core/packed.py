"""Packed training rows on disk: sharded safetensors files read lazily, row by row.

The data stage writes the training split as shards (`RUN/data/train/*.safetensors`), each holding

- `input_ids` int32 `[R, L]`, `position_ids` int32 `[R, L]`, `loss_mask` uint8 `[R, L]`, `domain` int16 `[R]`

(the layout of docs/ARCHITECTURE.md), and lists them in order in its manifest (`train_shards`: file, rows
used, sha256, bytes). Global row i — the key of everything downstream (logit store, mixture sampler) — is
row i of the shards' concatenation. A shard may hold more rows than the manifest uses from it (the last
shard of a source is cut at the source's token budget); readers see only the used rows.

`PackedRows` reads the bytes of the requested rows straight from the files (`os.pread` at offsets computed
from the safetensors header), so memory does not grow with the size of the split: no tensor is loaded
whole and no file stays mapped.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from core.artifacts import ArtifactError, atomic_write_bytes, read_manifest, sha256_file

ROW_FIELDS = ("input_ids", "position_ids", "loss_mask")  # [R, L] each
FIELDS = (*ROW_FIELDS, "domain")
DTYPES = {"input_ids": np.int32, "position_ids": np.int32, "loss_mask": np.uint8, "domain": np.int16}
_SAFETENSORS_DTYPES = {"I32": np.int32, "U8": np.uint8, "I16": np.int16, "I64": np.int64}


def write_packed_shard(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard atomically (the four FIELDS, cast to their dtypes); returns its record
    {file, rows, sha256, bytes} with `file` the name relative to the data folder's `train/` parent."""
    tensors = {name: np.ascontiguousarray(arrays[name], dtype=DTYPES[name]) for name in FIELDS}
    rows = tensors["input_ids"].shape[0]
    if any(tensors[name].shape[0] != rows for name in FIELDS):
        raise ValueError(f"{path}: fields have different row counts "
                         f"{ {name: tensors[name].shape for name in FIELDS} }")
    data = safetensors_save(tensors)  # no metadata: the bytes are a function of the rows alone
    atomic_write_bytes(path, data)
    return {"file": f"{Path(path).parent.name}/{Path(path).name}", "rows": int(rows),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_packed_file(path: Path) -> dict[str, np.ndarray]:
    """Every row of one packed file that is read whole (`heldout.safetensors`, small by design): the FIELDS
    as numpy arrays. A missing file or field is an ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: packed rows not found (run the data stage first)")
    tensors = safetensors_load(path.read_bytes())
    missing = [name for name in FIELDS if name not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing tensor(s) {missing} (found {sorted(tensors)}); rerun the stage that "
                            "wrote it")
    return {name: tensors[name] for name in FIELDS}


class _Shard:
    """Byte offsets of each tensor of one safetensors shard, from its header."""

    def __init__(self, path: Path, record: dict[str, Any], repair: str) -> None:
        self.path, self.rows = path, int(record["rows"])
        if not path.is_file():
            raise ArtifactError(f"{path}: data shard missing — {repair}")
        if path.stat().st_size != int(record["bytes"]):
            raise ArtifactError(f"{path}: data shard is {path.stat().st_size} bytes, the manifest says "
                                f"{record['bytes']} (truncated or corrupt) — {repair}")
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ArtifactError(f"{path}: unreadable safetensors header — {repair}") from None
        self.fields: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name in FIELDS:
            if name not in header:
                raise ArtifactError(f"{path}: missing tensor {name!r} — {repair}")
            info = header[name]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            self.fields[name] = (dtype, tuple(info["shape"]), 8 + size + int(info["data_offsets"][0]))
            if info["shape"][0] < self.rows:
                raise ArtifactError(f"{path}: {name} has {info['shape'][0]} rows, the manifest uses {self.rows}")

    def read(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows start..end of one tensor, as a fresh array."""
        dtype, shape, offset = self.fields[name]
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, (end - start) * row_bytes, offset + start * row_bytes)
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=dtype).reshape((end - start, *shape[1:])).copy()


class PackedRows:
    """The training rows of a finished data stage (`RUN/data`), read lazily.

    `len(rows)` rows of `rows.seq_len` tokens; `rows.domain` int16 `[N]` (small: read once, the mixture
    sampler needs it whole); `rows.read(start, end)` and `rows.take(indices)` return the FIELDS as numpy
    arrays. Opening checks every listed shard exists with its recorded size; `verify()` also checks sha256.
    Picklable (no open handles).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        manifest = read_manifest(self.data_dir, "data")
        self.repair = (f"repair with `distill data CONFIG --output-dir {self.data_dir.parent}` "
                       f"(recomputes only the damaged shards)")
        try:
            self.records = list(manifest["train_shards"])
            self.seq_len = int(manifest["seq_len"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{self.data_dir / 'manifest.json'}: no train_shards/seq_len — made by an older "
                                f"version; delete {self.data_dir} and rerun `distill data`") from None
        self.shards = [_Shard(self.data_dir / r["file"], r, self.repair) for r in self.records]
        self.starts = np.cumsum([0] + [s.rows for s in self.shards]).tolist()
        for shard in self.shards:
            if shard.fields["input_ids"][1][1:] != (self.seq_len,):
                raise ArtifactError(f"{shard.path}: rows of {shard.fields['input_ids'][1][1:]} tokens, "
                                    f"the manifest says seq_len={self.seq_len}")
        self.domain = np.concatenate([s.read("domain", 0, s.rows) for s in self.shards]) if self.shards \
            else np.zeros(0, np.int16)

    def __len__(self) -> int:
        return self.starts[-1]

    def verify(self) -> list[str]:
        """Files whose sha256 differs from the manifest (empty when all verify)."""
        return [r["file"] for r in self.records if sha256_file(self.data_dir / r["file"]) != r["sha256"]]

    def read(self, start: int, end: int) -> dict[str, np.ndarray]:
        """Rows start..end (global indices) of every field."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"{self.data_dir}: rows {start}..{end} out of range (the split has {len(self)})")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in FIELDS}
        s = bisect.bisect_right(self.starts, start) - 1
        while start < end:
            shard, first = self.shards[s], self.starts[s]
            stop = min(end, first + shard.rows)
            for name in FIELDS:
                parts[name].append(shard.read(name, start - first, stop - first))
            start, s = stop, s + 1
        return {name: _concat(chunks, name, self.seq_len) for name, chunks in parts.items()}

    def take(self, indices: Any) -> dict[str, np.ndarray]:
        """Rows at arbitrary global `indices` `[B]`, in that order."""
        rows = [self.read(int(i), int(i) + 1) for i in np.asarray(indices).reshape(-1)]
        return {name: _concat([r[name] for r in rows], name, self.seq_len) for name in FIELDS}


def _concat(chunks: list[np.ndarray], name: str, seq_len: int) -> np.ndarray:
    if chunks:
        return np.concatenate(chunks)
    shape = (0, seq_len) if name in ROW_FIELDS else (0,)
    return np.zeros(shape, DTYPES[name])
