"""The compact top-k logit store: sharded safetensors files of compressed teacher top-k, plus a manifest.

Budget: at k=64 with SmolLM2's 49152-token vocabulary the store must cost ≤ 2 bytes per entry (one position ×
one of its k candidates) with a reconstruction KL ≤ 1e-3 nats per position. Naive int64 ids + float32
logprobs cost 12 B/entry, and 16-bit ids alone already cost 2 B/entry, so both halves are compressed:

- **ids**: each position's k ids are stored sorted ascending (16-bit when the vocab fits, else 32-bit). Sorted
  ids are small gaps apart, and the same frequent tokens recur at neighbouring positions; LZMA over a whole
  sequence turns both into a fraction of their 16 bits (benchmarks/store_fidelity.py measures it). Sorting
  by id loses the logprob order, but that order is recovered from the dequantised logprobs, so it costs
  nothing to store.
- **logprobs**: only the shape r = logprob − top-1 logprob (≤ 0) is stored, as one code per entry from a
  non-uniform codebook. The KL cost of an error δ in a logprob is ≈ p·δ²/2, so the optimal step shrinks as
  1/√p: codes are uniform in s = exp(r/2) = √(p / p_top1) with step 2^-bits (`capture.logprob_bits`). Where
  that step in nats grows past `capture.logprob_max_step` (deep in the tail), codes become uniform in r with
  that step, down to `R_MIN`. Low-probability entries thus share a few codes, which LZMA packs into few bits.
- **tail**: log(mass outside the top-k) per position, float32. The absolute logprobs are rebuilt so that
  top-k mass + tail mass = 1 exactly; the top-1 logprob is therefore not stored.

benchmarks/store_fidelity.py measures the bytes per entry and the KL of the stored distribution to the
exact one (the README's measured claims table has the figures).

Each sequence is one LZMA blob (its tokens, sorted ids, codes, tail); a shard holds the concatenated blobs
and their offsets, so reading sequence i reads only its own bytes of the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import lzma
import math
import os
import shlex
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as safetensors_save

from core.artifacts import ArtifactError, atomic_write_bytes, read_manifest, sha256_file
from core.config import InputError
from core.records import TopK

FORMAT = "distill-topk-lzma-v1"
R_MIN = -80.0  # relative logprobs below this (mass < e^-80 of the top-1) are stored as R_MIN


def _lzma_filters(size: int) -> list[dict[str, Any]]:
    """LZMA2 settings for one blob of `size` raw bytes. lp=1/pb=1: the payload is mostly 2-byte values, so
    the coder is conditioned on byte parity (≈1% smaller). The dictionary only needs to span the blob:
    preset 6's 8 MiB one gives the very same bytes but costs its set-up on every call, a large share of
    the encode time of a short row."""
    return [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 1, "pb": 1, "dict_size": max(4096, size)}]


@dataclass(frozen=True)
class Codec:
    """How one sequence of top-k rows is packed into bytes (and back). All fields go in the manifest."""

    k: int
    vocab_size: int
    logprob_bits: int = 7
    logprob_max_step: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.logprob_bits <= 14:
            raise InputError(f"capture.logprob_bits: must be in [2, 14], got {self.logprob_bits}")
        if not self.logprob_max_step > 0.0:
            raise InputError(f"capture.logprob_max_step: must be > 0 nats, got {self.logprob_max_step}")
        if not 0 < self.k <= self.vocab_size:
            raise InputError(f"capture.top_k: must be in [1, vocab_size={self.vocab_size}], got {self.k}")

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype("u1") if len(self.table) <= 256 else np.dtype("<u2")

    @cached_property
    def _grid(self) -> tuple[int, int, float, int]:
        """(top level 2^bits, lowest fine level j0, r at j0, number of coarse codes)."""
        top = 1 << self.logprob_bits
        # Fine levels j give r = 2 ln(j / top); their spacing 2 ln(j / (j-1)) ≈ 2/j reaches max_step at j0.
        j0 = max(1, min(top, math.ceil(2.0 / self.logprob_max_step)))
        r0 = 2.0 * math.log(j0 / top)
        coarse = max(1, math.ceil((r0 - R_MIN) / self.logprob_max_step))
        return top, j0, r0, coarse

    @cached_property
    def table(self) -> np.ndarray:
        """float64 [codes]: the relative logprob r of each code; code 0 is r = 0 (the top-1), r decreases."""
        top, j0, r0, coarse = self._grid
        fine = 2.0 * np.log(np.arange(top, j0 - 1, -1, dtype=np.float64) / top)
        deep = r0 - self.logprob_max_step * np.arange(1, coarse + 1, dtype=np.float64)
        return np.concatenate([fine, deep])

    def quantize(self, rel: np.ndarray) -> np.ndarray:
        """Relative logprobs (≤ 0, -inf allowed) → int64 codes of the same shape."""
        top, j0, r0, coarse = self._grid
        rel = np.clip(np.nan_to_num(rel, nan=R_MIN, neginf=R_MIN), R_MIN, 0.0)
        j = np.rint(np.exp(rel / 2.0) * top)
        deep = np.clip(np.rint((r0 - rel) / self.logprob_max_step), 1, coarse)
        return np.where(j >= j0, top - j, top - j0 + deep).astype(np.int64)

    # ---- one sequence ⇄ bytes ----------------------------------------------------------------------

    def encode(self, tokens: torch.Tensor, top: TopK) -> bytes:
        """Tokens int [L] and their TopK (ids/logprobs [L, k], tail [L]) → one compressed blob."""
        ids = top.ids.cpu().numpy().astype(np.int64)
        lps = top.logprobs.cpu().numpy().astype(np.float64)
        length, k = ids.shape
        if k != self.k or tokens.shape != (length,):
            raise ValueError(f"store: expected tokens [L] and top-k [L, {self.k}], got {tuple(tokens.shape)} "
                             f"and {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"store: top-k ids outside [0, vocab_size={self.vocab_size})")
        tail = top.tail_logmass.cpu().numpy().astype("<f4")
        if not np.isfinite(tail).all() or np.isnan(lps).any():
            raise ValueError("store: NaN logprobs or non-finite tail log-mass from the teacher")
        order = np.argsort(ids, axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(ids, order, -1)
        rel = np.take_along_axis(lps - lps.max(axis=-1, keepdims=True), order, -1)
        raw = b"".join([
            tokens.cpu().numpy().astype(self.id_dtype).tobytes(),
            sorted_ids.astype(self.id_dtype).tobytes(),
            self.quantize(rel).astype(self.code_dtype).tobytes(),
            tail.tobytes(),
        ])
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(raw)))

    def decode(self, blob: bytes, length: int) -> tuple[torch.Tensor, TopK]:
        """A blob from `encode` of a length-L sequence → tokens int64 [L] and its dequantised TopK."""
        n = length * self.k
        id_size, code_size = self.id_dtype.itemsize, self.code_dtype.itemsize
        sizes = [length * id_size, n * id_size, n * code_size, length * 4]
        raw = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_lzma_filters(sum(sizes)))
        if len(raw) != sum(sizes):
            raise ValueError(f"store: blob decodes to {len(raw)} bytes, expected {sum(sizes)}")
        cut = np.cumsum([0] + sizes)
        tokens = np.frombuffer(raw[cut[0]:cut[1]], self.id_dtype).astype(np.int64)
        ids = np.frombuffer(raw[cut[1]:cut[2]], self.id_dtype).reshape(length, self.k).astype(np.int64)
        codes = np.frombuffer(raw[cut[2]:cut[3]], self.code_dtype).reshape(length, self.k)
        tail = np.frombuffer(raw[cut[3]:cut[4]], "<f4").astype(np.float64)
        # Lowest code first = highest logprob first; the stable sort keeps ties in ascending id order.
        order = np.argsort(codes, axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, -1)
        rel = self.table[np.take_along_axis(codes, order, -1)]
        covered = np.log(np.maximum(-np.expm1(tail), np.finfo(np.float64).tiny))  # log(1 - tail mass)
        rel_max = rel.max(axis=-1, keepdims=True)
        log_norm = rel_max[:, 0] + np.log(np.exp(rel - rel_max).sum(axis=-1))
        logprobs = rel + (covered - log_norm)[:, None]
        top = TopK(ids=torch.from_numpy(ids), logprobs=torch.from_numpy(logprobs.astype(np.float32)),
                   tail_logmass=torch.from_numpy(tail.astype(np.float32)))
        return torch.from_numpy(tokens), top

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "k": self.k, "vocab_size": self.vocab_size, "logprob_bits": self.logprob_bits,
                "logprob_max_step": self.logprob_max_step, "r_min": R_MIN,
                "id_dtype": self.id_dtype.name, "code_dtype": self.code_dtype.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Codec:
        if d.get("format") != FORMAT or d.get("r_min") != R_MIN:
            raise ArtifactError(f"{where}: store format {d.get('format')!r} (r_min {d.get('r_min')}) is not "
                                f"{FORMAT!r} (r_min {R_MIN}) that this version reads")
        return cls(k=int(d["k"]), vocab_size=int(d["vocab_size"]), logprob_bits=int(d["logprob_bits"]),
                   logprob_max_step=float(d["logprob_max_step"]))


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:08d}-{end:08d}.safetensors"


def write_shard(folder: Path, start: int, tokens: torch.Tensor, tops: list[TopK], codec: Codec) -> dict[str, Any]:
    """Encode sequences `start .. start+S` (tokens int [S, L], one TopK each) into one shard, written
    atomically; returns its manifest record {file, start, end, sha256, bytes}."""
    blobs = [codec.encode(tokens[i], top) for i, top in enumerate(tops)]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    data = safetensors_save(
        {"blob": np.frombuffer(b"".join(blobs), dtype=np.uint8), "offsets": offsets},
        # One metadata key only: safetensors may write several in any order, which breaks byte-identity.
        metadata={"distill": json.dumps({"codec": codec.to_dict(), "start": start,
                                         "seq_len": int(tokens.shape[1])}, sort_keys=True)},
    )
    end = start + len(tops)
    path = Path(folder) / shard_name(start, end)
    atomic_write_bytes(path, data)
    return {"file": path.name, "start": start, "end": end, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data)}


def store_fields(codec: Codec, seq_len: int, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `store` entry for finished `shards` (records from write_shard, in sequence order)."""
    num = shards[-1]["end"] if shards else 0
    total = sum(r["bytes"] for r in shards)
    entries = max(1, num * seq_len * codec.k)
    return {"codec": codec.to_dict(), "num_sequences": num, "seq_len": seq_len, "shards": shards,
            "total_bytes": total, "bytes_per_entry": total / entries, "bytes_per_token": total / entries * codec.k}


def verify_shard(folder: Path, record: dict[str, Any]) -> None:
    """Raise ArtifactError naming the file, and the command that repairs it, if a shard is missing or its
    sha256 differs from `record`."""
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise ArtifactError(f"{path}: shard missing; {repair_hint(folder)}")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise ArtifactError(f"{path}: sha256 {digest[:16]}… does not match the manifest's {record['sha256'][:16]}… "
                            f"(corrupt or truncated shard); {repair_hint(folder)}")


def repair_hint(folder: Path) -> str:
    """How to repair a store RUN/logits: `distill capture` on a complete store recomputes only the shards that
    are missing or fail their checksum. Names the run's recorded config when there is one."""
    run = Path(folder).parent
    config = shlex.quote(str(run / "config.yaml")) if (run / "config.yaml").is_file() else "CONFIG"
    return f"`distill capture {config} --output-dir {shlex.quote(str(run))}` recomputes it (and only it)"


# ---------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardLayout:
    """Where one shard's two tensors lie in its file (from the safetensors header): `offsets` int64
    `[S + 1]` at byte `offsets_at`, the concatenated blobs uint8 at byte `blob_at`, `blob_bytes` long."""

    path: Path
    sequences: int
    offsets_at: int
    blob_at: int
    blob_bytes: int

    @classmethod
    def read(cls, path: Path, sequences: int, repair: str) -> _ShardLayout:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            offsets, blob = header["offsets"], header["blob"]
            if offsets["dtype"] != "I64" or offsets["shape"] != [sequences + 1] or blob["dtype"] != "U8":
                raise ValueError(f"offsets {offsets['dtype']} {offsets['shape']}, blob {blob['dtype']}; "
                                 f"expected I64 [{sequences + 1}] and U8")
            (o_begin, o_end), (b_begin, b_end) = offsets["data_offsets"], blob["data_offsets"]
            if o_end - o_begin != 8 * (sequences + 1) or b_end - b_begin != int(blob["shape"][0]):
                raise ValueError("tensor byte ranges do not match their shapes")
        except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ArtifactError(f"{path}: unreadable shard ({err}); {repair}") from None
        return cls(Path(path), sequences, 8 + size + int(o_begin), 8 + size + int(b_begin), int(b_end - b_begin))

    def blob(self, j: int, repair: str) -> bytes:
        """The compressed bytes of sequence j of this shard."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            begin, end = (int(x) for x in np.frombuffer(os.pread(fd, 16, self.offsets_at + 8 * j), "<i8"))
            if not 0 <= begin <= end <= self.blob_bytes:
                raise ArtifactError(f"{self.path}: sequence {j} has blob bytes {begin}..{end} outside the "
                                    f"shard's {self.blob_bytes}; {repair}")
            data = os.pread(fd, end - begin, self.blob_at + begin)
        finally:
            os.close(fd)
        if len(data) != end - begin:
            raise ArtifactError(f"{self.path}: truncated shard (sequence {j}); {repair}")
        return data


class LogitStore:
    """Random access to a finished store by sequence index: `store[i]` → TopK (float32, dequantised).

    Opening checks the manifest and every shard's sha256 (`verify=False` skips the hashing). Reading a
    sequence reads only its two offsets and its blob (`os.pread` at byte positions from the shard's
    safetensors header, kept per shard once read) and decompresses the blob. No file stays open or mapped:
    the touched pages of a memory-mapped shard stay resident, so a reader's memory would grow with the
    number of shards it visits, i.e. with the size of the store (benchmarks/scale.py --parts 4).
    Picklable (no open handles), so DataLoader workers can share one.
    """

    def __init__(self, path: Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "capture")
        where = str(self.path / "manifest.json")
        try:
            store = self.manifest["store"]
            self.codec = Codec.from_dict(store["codec"], where)
            self.seq_len = int(store["seq_len"])
            self.shards = sorted(store["shards"], key=lambda r: r["start"])
            num = int(store["num_sequences"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{where}: not a logit-store manifest ({err!r})") from None
        self.k = self.codec.k
        covered = 0
        for record in self.shards:
            if record["start"] != covered:
                raise ArtifactError(f"{where}: shards do not cover sequences contiguously at {covered}")
            covered = record["end"]
            if verify:
                verify_shard(self.path, record)
        if covered != num:
            raise ArtifactError(f"{where}: shards cover {covered} sequences, manifest says {num}")
        self._num = num
        self._starts = [r["start"] for r in self.shards]
        self._layout: dict[int, _ShardLayout] = {}

    def __len__(self) -> int:
        return self._num

    def _shard(self, s: int) -> _ShardLayout:
        if s not in self._layout:
            record = self.shards[s]
            self._layout[s] = _ShardLayout.read(self.path / record["file"], record["end"] - record["start"],
                                                repair_hint(self.path))
        return self._layout[s]

    def _read(self, i: int) -> tuple[torch.Tensor, TopK]:
        if not -self._num <= i < self._num:
            raise IndexError(f"{self.path}: sequence {i} out of range (store has {self._num})")
        i %= self._num
        s = bisect.bisect_right(self._starts, i) - 1
        blob = self._shard(s).blob(i - self.shards[s]["start"], repair_hint(self.path))
        try:
            return self.codec.decode(blob, self.seq_len)
        except (lzma.LZMAError, ValueError) as err:
            raise ArtifactError(f"{self.path / self.shards[s]['file']}: sequence {i} is corrupt ({err}); "
                                f"{repair_hint(self.path)}") from None

    def __getitem__(self, i: int) -> TopK:
        return self._read(i)[1]

    def tokens(self, i: int) -> torch.Tensor:
        """The token ids int64 [L] the teacher scored for sequence i (to check alignment with the data)."""
        return self._read(i)[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids int64 [B, L, k], logprobs float32 [B, L, k], tail_logmass float32 [B, L]."""
        tops = [self[i] for i in indices]
        return (torch.stack([t.ids for t in tops]), torch.stack([t.logprobs for t in tops]),
                torch.stack([t.tail_logmass for t in tops]))


# ---------------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------------


def reconstruction_kl(exact: TopK, stored: TopK) -> torch.Tensor:
    """KL(exact ‖ stored) in nats per position, float64 [L], over k+1 outcomes: the k top ids and the tail
    bucket. Both must hold the same id set per position (the store keeps ids exactly); order may differ."""
    e_order, s_order = exact.ids.argsort(-1), stored.ids.argsort(-1)
    if not torch.equal(exact.ids.gather(-1, e_order), stored.ids.gather(-1, s_order)):
        raise ValueError("reconstruction_kl: the two top-k id sets differ")
    p = torch.cat([exact.logprobs.double().gather(-1, e_order), exact.tail_logmass.double()[..., None]], -1)
    q = torch.cat([stored.logprobs.double().gather(-1, s_order), stored.tail_logmass.double()[..., None]], -1)
    # Both are renormalised: float32 top-k + tail of the exact side sums to 1 only up to rounding.
    p, q = p.log_softmax(-1), q.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)
