"""The `data` stage: stream the configured sources, tokenize them in parallel, pack them into shards of
fixed-length training rows.

Each source contributes `train_tokens × weight / Σweights` tokens to the training pool (rounded up to whole
rows) and `heldout_sequences_per_domain` rows per domain to the held-out set, drawn from a split of the
source that never overlaps its training text (every 20th document, in the source's own order). Documents
are packed back to back, each followed by EOS; `position_ids` restart at 0 at every document start so that
downstream models keep documents apart (see core/packing.py). Rows never mix sources, so every row has
one domain.

Scale: a source is read as a stream (JSONL line by line, text files one at a time, `datasets` memory-mapped
or `streaming=True`) and cut into *chunks* of consecutive documents of about `data.shard_chars`
characters. A chunk is the unit of work: it is shuffled (seeded by source and chunk index), tokenized
and packed (up to the source's whole budget: no chunk needs more rows than that) and written as one shard
file (core/packed.py) by one of `data.num_proc` worker processes, so a shard's bytes are a function of
its chunk alone. The main process keeps at most `num_proc + 1` chunks in flight, so memory does not
grow with the token budget; reading stops once the source's budget is filled.

Resume: the stage builds in `RUN/.data.partial/`, recording each finished shard (sha256) in
`progress.json`; a rerun after a crash (even `kill -9`) recomputes only unrecorded shards and produces the
same bytes. The folder becomes `RUN/data/` in one rename once the manifest is written. On a complete stage
whose shard is missing or corrupt, `distill data` recomputes only that shard.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from core.artifacts import (
    ArtifactError,
    atomic_write_json,
    is_complete,
    sha256_file,
    sha256_json,
    tokenizer_hash,
    write_manifest,
)
from core.config import InputError, RunConfig, SourceConfig, to_dict
from core.packed import FIELDS, PackedRows, write_packed_shard
from core.records import HELDOUT_EVERY, model_vocab_size
from distill.corpora import builtin_corpus
from synth_data.sft import chat_to_training_ids
from teachers.resolve import load_tokenizer, resolve_teacher, teacher_identity

PROGRESS = "progress.json"
PARTIAL = ".data.partial"
_CHUNK_SEED_STRIDE = 1_000_003  # chunk j of a source is shuffled with Random(seed + stride·j)


@dataclass
class Document:
    """One tokenized document: `ids` int `[T]`, `loss_mask` `[T]` (1 where token t is a training target);
    numpy arrays in the stage (a chunk's millions of Python ints would cost ~30 B per token), or lists."""

    ids: np.ndarray | list[int]
    loss_mask: np.ndarray | list[int]


# ---------------------------------------------------------------------------------------------------
# Sources as streams of raw documents (a text, or a chat for `synth`)
# ---------------------------------------------------------------------------------------------------


def _in_split(index: int, split: str) -> bool:
    return (index % HELDOUT_EVERY == 0) == (split == "heldout")


def _stream(src: SourceConfig, split: str, run_dir: Path) -> Iterator[Any]:
    """The raw documents of one source split, in the source's order, read lazily."""
    if src.kind == "builtin":
        yield from builtin_corpus(src.domain, split)  # split by the corpus's own hash rule
        return
    raw = {"jsonl": _jsonl_texts, "text_files": _file_texts, "hf": _hf_texts, "synth": _synth_chats}[src.kind]
    for i, doc in enumerate(raw(src, run_dir)):
        if _in_split(i, split):
            yield doc


def _jsonl_texts(src: SourceConfig, run_dir: Path) -> Iterator[str]:
    path = Path(src.path)
    if not path.is_file():
        raise FileNotFoundError(f"data source {src.name!r}: {path} does not exist")
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[src.text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{lineno}: expected a JSON object with a {src.text_field!r} field") from None
            yield text


def _file_texts(src: SourceConfig, run_dir: Path) -> Iterator[str]:
    files = sorted(glob.glob(str(src.path), recursive=True))
    if not files:
        raise FileNotFoundError(f"data source {src.name!r}: no files match {src.path}")
    for name in files:
        yield Path(name).read_text(errors="replace")


def _hf_texts(src: SourceConfig, run_dir: Path) -> Iterator[str]:
    """A `save_to_disk` folder (memory-mapped Arrow, read in batches), else a hub id or a local folder of
    data files through `load_dataset(..., streaming=True)` — never a whole column in a list."""
    import datasets

    path = Path(src.path)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise InputError(f"data source {src.name!r}: split {src.split!r} not in {list(ds)}")
            ds = ds[src.split]
        if src.text_field not in ds.column_names:
            raise InputError(f"data source {src.name!r}: field {src.text_field!r} not in {ds.column_names}")
        for batch in ds.select_columns([src.text_field]).iter(batch_size=1000):
            yield from batch[src.text_field]
        return
    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split, streaming=True)
    except ValueError as err:
        raise InputError(f"data source {src.name!r}: {err}") from None
    for row in ds:
        if src.text_field not in row:
            raise InputError(f"data source {src.name!r}: field {src.text_field!r} not in {sorted(row)}")
        yield row[src.text_field]


def _synth_chats(src: SourceConfig, run_dir: Path) -> Iterator[list[dict]]:
    """Chat samples from `distill synth` (loss on assistant tokens only)."""
    import datasets

    folder = Path(src.path) if src.path else Path(run_dir) / "synth"
    if not is_complete(folder, "synth"):
        raise ArtifactError(f"data source {src.name!r}: {folder} is not a completed synth artifact "
                            "(run `distill synth`)")
    for batch in datasets.load_from_disk(str(folder / "dataset")).iter(batch_size=256):
        yield from batch["messages"]


def _chunks(docs: Iterable[Any], max_chars: int) -> Iterator[list[Any]]:
    """Consecutive documents in groups of about `max_chars` characters (a group ends past it)."""
    chunk: list[Any] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------
# Tokenizing and packing one chunk (runs in a worker process)
# ---------------------------------------------------------------------------------------------------

_TOKENIZER: Any = None


def _init_worker(teacher_dir: str) -> None:
    """Load the tokenizer once per process (also in the main process for `num_proc = 1`)."""
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: num_proc is the parallelism

    _TOKENIZER = load_tokenizer(Path(teacher_dir))


def _tokenize(docs: list[Any]) -> Iterator[Document]:
    tok = _TOKENIZER
    if docs and not isinstance(docs[0], str):
        for messages in docs:
            ids, mask = chat_to_training_ids(messages, tok)
            yield Document(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8))
        return
    for start in range(0, len(docs), 256):
        for ids in tok(docs[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.append(tok.eos_token_id)
            yield Document(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=np.uint8))


def pack(docs: Iterable[Document], seq_len: int, max_rows: int | None) -> dict[str, np.ndarray]:
    """Pack documents into rows of `seq_len` tokens (input_ids, position_ids, loss_mask `[R, L]`); the last
    partial row is dropped. A document longer than the room left continues in the next row, its position
    ids restarting there. The target at the first token of each piece is masked: it cannot be predicted
    from inside the row's part of the document."""
    docs = list(docs)
    total = sum(len(d.ids) for d in docs)
    rows = total // seq_len if max_rows is None else min(total // seq_len, max_rows)
    n = rows * seq_len
    ids = np.concatenate([np.asarray(d.ids, dtype=np.int32) for d in docs] or [np.zeros(0, np.int32)])[:n]
    mask = np.concatenate([np.asarray(d.loss_mask, dtype=np.uint8) for d in docs] or [np.zeros(0, np.uint8)])[:n]
    lengths = np.array([len(d.ids) for d in docs], dtype=np.int64)
    piece_start = np.zeros(n, dtype=bool)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else np.zeros(0, np.int64)
    piece_start[doc_starts[doc_starts < n]] = True
    piece_start[::seq_len] = True
    # int32 index arithmetic: a chunk's temporaries stay a few bytes per token (n < 2^31 per chunk).
    index = np.arange(n, dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(piece_start, index, np.int32(0))) if n else index
    shape = (rows, seq_len)
    return {"input_ids": ids.reshape(shape),
            "position_ids": (index - last_start).reshape(shape),
            "loss_mask": np.where(piece_start, 0, mask).astype(np.uint8).reshape(shape)}


def _pack_chunk(docs: list[Any], seq_len: int, seed: int, domain: int, max_rows: int) -> dict[str, np.ndarray]:
    """Shuffle, tokenize and pack one chunk into at most `max_rows` rows (tokenizing stops there)."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    taken, tokens = [], 0
    for doc in _tokenize(docs):
        taken.append(doc)
        tokens += len(doc.ids)
        if tokens >= max_rows * seq_len:
            break
    arrays = pack(taken, seq_len, max_rows)
    arrays["domain"] = np.full(arrays["input_ids"].shape[0], domain, dtype=np.int16)
    return arrays


def _write_chunk(docs: list[Any], seq_len: int, seed: int, domain: int, max_rows: int, path: str) -> dict[str, Any]:
    return write_packed_shard(Path(path), _pack_chunk(docs, seq_len, seed, domain, max_rows))


class _Inline:
    """The `ProcessPoolExecutor` interface, run in this process (`data.num_proc = 1`)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def _source_shards(pool, src: SourceConfig, index: int, rows: int, cfg: RunConfig, domain: int,
                   progress: _Progress, run_dir: Path) -> list[dict[str, Any]]:
    """Records of the shards that hold source `index`'s first `rows` training rows (the last one cut to the
    budget). Chunks are packed `num_proc` at a time; those already in `progress` are not recomputed."""
    dcfg = cfg.data
    window = dcfg.num_proc + 1
    pending: deque[tuple[str, Future]] = deque()
    used: list[dict[str, Any]] = []
    total = 0

    def collect() -> None:
        nonlocal total
        key, future = pending.popleft()
        record = progress.add(key, future.result())
        if total < rows and record["rows"] > 0:
            used.append({**record, "rows": min(record["rows"], rows - total)})
            total += used[-1]["rows"]

    for j, chunk in enumerate(_chunks(_stream(src, "train", run_dir), dcfg.shard_chars)):
        key = f"{index:03d}-{j:06d}"
        if key in progress.done:
            future: Future = Future()
            future.set_result(progress.done[key])
        else:
            future = pool.submit(_write_chunk, chunk, dcfg.seq_len, dcfg.seed + index + _CHUNK_SEED_STRIDE * j,
                                 domain, rows, str(progress.partial / "train" / f"{key}.safetensors"))
        pending.append((key, future))
        while pending and (len(pending) >= window or pending[0][1].done()):
            collect()
        if total >= rows:
            break
    while pending:
        collect()
    return used


def _heldout_rows(src: SourceConfig, rows: int, cfg: RunConfig, domain: int, run_dir: Path) -> dict[str, np.ndarray]:
    """The first `rows` held-out rows of a source, packed in this process (a few rows: no shards)."""
    parts, total = [], 0
    for j, chunk in enumerate(_chunks(_stream(src, "heldout", run_dir), cfg.data.shard_chars)):
        part = _pack_chunk(chunk, cfg.data.seq_len, cfg.data.seed + _CHUNK_SEED_STRIDE * j, domain, rows - total)
        parts.append(part)
        total += parts[-1]["input_ids"].shape[0]
        if total >= rows:
            break
    return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS} if parts else {}


@dataclass
class _Progress:
    """The finished shards of a build in `partial/progress.json`, by chunk key ("SSS-JJJJJJ")."""

    partial: Path
    fingerprint: str
    done: dict[str, dict[str, Any]]

    def add(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        record = self.done.setdefault(key, record)
        atomic_write_json(self.partial / PROGRESS, {"fingerprint": self.fingerprint, "shards": self.done})
        return record


def _resume(partial: Path, fingerprint: str) -> _Progress:
    """Shards of an interrupted build with the same fingerprint whose files still verify; a build with other
    settings is discarded (it is not a finished artifact, and its rows would not be this config's)."""
    progress: dict[str, Any] = {}
    if (partial / PROGRESS).is_file():
        try:
            progress = json.loads((partial / PROGRESS).read_text())
        except json.JSONDecodeError:
            progress = {}
    if progress.get("fingerprint") != fingerprint:
        if partial.exists():
            print(f"data: discarding the unfinished build in {partial} (made with other settings)")
            shutil.rmtree(partial)
        progress = {"fingerprint": fingerprint, "shards": {}}
    (partial / "train").mkdir(parents=True, exist_ok=True)
    for tmp in (partial / "train").glob(".*.tmp"):
        tmp.unlink()
    done = {key: r for key, r in progress["shards"].items()
            if (partial / r["file"]).is_file() and sha256_file(partial / r["file"]) == r["sha256"]}
    atomic_write_json(partial / PROGRESS, {"fingerprint": fingerprint, "shards": done})
    if done:
        print(f"data: resuming, {len(done)} shard(s) already done in {partial}")
    return _Progress(partial, fingerprint, done)


def _reopen_if_damaged(out: Path, partial: Path) -> bool:
    """True when `out` is a complete stage whose shards all verify; a damaged one is moved back to the
    partial folder (so only the damaged shards are rebuilt) and False returned."""
    if not is_complete(out, "data"):
        return False
    try:
        bad = PackedRows(out).verify()
    except ArtifactError as err:
        bad = [str(err)]
    if not bad:
        return True
    print(f"data: {out} has damaged or missing shards ({', '.join(bad)}); recomputing only those")
    (out / "manifest.json").unlink()
    if partial.exists():
        shutil.rmtree(partial)
    os.replace(out, partial)
    return False


def build_data(cfg: RunConfig, run_dir: Path) -> Path:
    """The `data` stage. Returns RUN/data; returns at once if it is already complete and verifies."""

    run_dir = Path(run_dir)
    out, partial = run_dir / "data", run_dir / PARTIAL
    if _reopen_if_damaged(out, partial):
        return out
    dcfg = cfg.data
    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    _init_worker(str(teacher_dir))
    tokenizer = load_tokenizer(teacher_dir)
    vocab_size = model_vocab_size(teacher_dir)
    settings = {k: v for k, v in to_dict(dcfg).items() if k != "num_proc"}  # num_proc does not change the rows
    progress = _resume(partial, sha256_json({"data": settings, "tokenizer": tokenizer_hash(tokenizer)}))

    domains = sorted({s.domain for s in dcfg.sources})
    total_weight = sum(s.weight for s in dcfg.sources)
    pool = _Inline() if dcfg.num_proc == 1 else ProcessPoolExecutor(
        dcfg.num_proc, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(str(teacher_dir),))
    shards, heldout_parts, stats = [], [], []
    try:
        for i, src in enumerate(dcfg.sources):
            rows = max(1, math.ceil(dcfg.train_tokens * src.weight / total_weight / dcfg.seq_len))
            records = _source_shards(pool, src, i, rows, cfg, domains.index(src.domain), progress, run_dir)
            stats.append(_source_stats(src, records, rows, dcfg.seq_len))
            shards += records
            if src.domain not in {s["domain"] for s in stats[:-1]} and dcfg.heldout_sequences_per_domain > 0:
                held = _heldout_rows(src, dcfg.heldout_sequences_per_domain, cfg, domains.index(src.domain), run_dir)
                if held:
                    heldout_parts.append(held)
                stats[-1]["heldout_rows"] = int(held["input_ids"].shape[0]) if held else 0
    finally:
        pool.shutdown(cancel_futures=True)
    _finish(cfg, run_dir, partial, shards, heldout_parts, stats, domains,
            teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, vocab_size))
    return out


def _source_stats(src: SourceConfig, records: list[dict], rows: int, seq_len: int) -> dict[str, Any]:
    got = sum(r["rows"] for r in records)
    if got == 0:
        raise InputError(f"data source {src.name!r}: not enough text for one {seq_len}-token row")
    if got < rows:
        print(f"data: source {src.name!r} has only {got} rows of the {rows} its weight asks for; "
              f"the sampler will repeat them")
    return {"name": src.name, "kind": src.kind, "domain": src.domain, "weight": src.weight, "train_rows": got}


def _finish(cfg: RunConfig, run_dir: Path, partial: Path, shards: list[dict], heldout_parts: list[dict],
            stats: list[dict], domains: list[str], teacher: dict[str, Any]) -> None:
    """Held-out rows, the manifest (last), then `partial` → `RUN/data` in one rename."""
    dcfg = cfg.data
    if heldout_parts:
        heldout = {k: np.concatenate([p[k] for p in heldout_parts]) for k in FIELDS}
        save_file(heldout, str(partial / ".heldout.safetensors.tmp"))
        os.replace(partial / ".heldout.safetensors.tmp", partial / "heldout.safetensors")
    num_heldout = sum(p["input_ids"].shape[0] for p in heldout_parts)
    used = {r["file"] for r in shards}
    for path in (partial / "train").glob("*.safetensors"):
        if f"train/{path.name}" not in used:
            path.unlink()  # chunks packed past a source's budget
    domain_rows = dict.fromkeys(domains, 0)
    for stat in stats:
        domain_rows[stat["domain"]] += stat["train_rows"]
    num_train = sum(r["rows"] for r in shards)
    write_manifest(
        partial, "data", config=to_dict(dcfg), teacher=teacher, domains=domains, sources=stats,
        seq_len=dcfg.seq_len, num_train=num_train, num_heldout=num_heldout,
        train_tokens=num_train * dcfg.seq_len, domain_rows=domain_rows, train_shards=shards,
    )
    out = run_dir / "data"
    if out.exists():
        shutil.rmtree(out)  # an incomplete folder of an older version: nothing in it is a finished artifact
    os.replace(partial, out)
    per_source = ", ".join(f"{s['name']}={s['train_rows']}" for s in stats)
    print(f"data: {num_train} train rows × {dcfg.seq_len} tokens in {len(shards)} shard(s) ({per_source}) → {out}")


def load_split(data_dir: Path, split: str = "train") -> dict[str, np.ndarray]:
    """A whole packed split (`train` or `heldout`) as numpy arrays — for small runs and tests; training
    and capture read rows lazily through `core.packed.PackedRows`."""
    from safetensors.numpy import load_file

    if split == "train":
        rows = PackedRows(data_dir)
        return rows.read(0, len(rows))
    path = Path(data_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise ArtifactError(f"{path}: missing — run the data stage first")
    return load_file(str(path))
