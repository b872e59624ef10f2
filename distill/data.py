"""The `data` stage: tokenize the configured sources and pack them into fixed-length training rows.

Each source contributes `train_tokens × weight / Σweights` tokens to the training pool (rounded up to whole
rows) and `heldout_sequences_per_domain` rows per domain to the held-out set, drawn from a split of the
source that never overlaps its training text. Documents are packed back to back, each followed by EOS;
`position_ids` restart at 0 at every document start so that downstream models keep documents apart
(see distill/packing.py). Rows never mix sources, so every row has one domain.

Output (`RUN/data/`): `train.safetensors`, `heldout.safetensors` (input_ids, position_ids, loss_mask,
domain) and a manifest listing the domains, per-source counts and the tokenizer that made the ids.
"""

from __future__ import annotations

import glob
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from distill.artifacts import ArtifactError, atomic_dir, is_complete, write_manifest
from distill.config import RunConfig, SourceConfig, to_dict


@dataclass
class Document:
    """One tokenized document; `loss_mask[t]` is 1 where token t is a training target."""

    ids: list[int]
    loss_mask: list[int]


def _read_texts(src: SourceConfig, split: str, run_dir: Path) -> list[str]:
    """Raw texts of one source split (`heldout` for held-out rows, `src.split` for training)."""
    if src.kind == "builtin":
        from distill.corpora import builtin_corpus

        return builtin_corpus(src.domain, split)
    path = Path(src.path)
    if src.kind == "jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"data source {src.name!r}: {path} does not exist")
        texts = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[src.text_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a {src.text_field!r} field") from None
        return _split(texts, split)
    if src.kind == "text_files":
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise FileNotFoundError(f"data source {src.name!r}: no files match {path}")
        return _split([Path(f).read_text(errors="replace") for f in files], split)
    if src.kind == "hf":
        import datasets

        ds = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ValueError(f"data source {src.name!r}: split {src.split!r} not in {list(ds)}")
            ds = ds[src.split]
        if src.text_field not in ds.column_names:
            raise ValueError(f"data source {src.name!r}: field {src.text_field!r} not in {ds.column_names}")
        return _split(list(ds[src.text_field]), split)
    raise ValueError(f"data source {src.name!r}: unsupported kind {src.kind!r}")


def _split(texts: list[str], split: str, heldout_share: float = 0.05) -> list[str]:
    """Deterministic train/held-out split of a user corpus: every 20th document is held out."""
    stride = round(1 / heldout_share)
    if split == "heldout":
        return texts[::stride]
    return [t for i, t in enumerate(texts) if i % stride]


def _documents(src: SourceConfig, split: str, tokenizer, run_dir: Path, seed: int) -> Iterator[Document]:
    """Documents of one source split in a seeded order, tokenized lazily so that packing can stop as soon
    as the source's share of the budget is filled."""
    if src.kind == "synth":
        docs = list(_synth_documents(src, split, tokenizer, run_dir))
        random.Random(seed).shuffle(docs)
        yield from docs
        return
    texts = _read_texts(src, split, run_dir)
    random.Random(seed).shuffle(texts)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        yield Document(ids, [1] * len(ids))


def _synth_documents(src: SourceConfig, split: str, tokenizer, run_dir: Path) -> Iterator[Document]:
    """Chat samples from `distill synth`: loss on assistant tokens only."""
    import datasets

    from synth_data.sft import chat_to_training_ids

    folder = Path(src.path) if src.path else run_dir / "synth"
    if not is_complete(folder, "synth"):
        raise ArtifactError(f"data source {src.name!r}: {folder} is not a completed synth artifact (run `distill synth`)")
    rows = datasets.load_from_disk(str(folder / "dataset"))
    for i, row in enumerate(rows):
        if (split == "heldout") != (i % 20 == 0):
            continue
        ids, mask = chat_to_training_ids(row["messages"], tokenizer)
        yield Document(ids, mask)


def pack(docs: Iterator[Document], seq_len: int, max_rows: int | None) -> dict[str, torch.Tensor]:
    """Pack documents into rows of `seq_len` tokens; a document longer than the room left continues in
    the next row (its position ids restart there). The target at a document's first token is masked:
    it cannot be predicted from inside the document."""
    rows_ids, rows_pos, rows_mask = [], [], []
    ids: list[int] = []
    pos: list[int] = []
    mask: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc.ids):
            take = min(seq_len - len(ids), len(doc.ids) - start)
            ids += doc.ids[start:start + take]
            pos += list(range(take))
            mask += [0] + doc.loss_mask[start + 1:start + take]
            start += take
            if len(ids) == seq_len:
                rows_ids.append(ids)
                rows_pos.append(pos)
                rows_mask.append(mask)
                ids, pos, mask = [], [], []
                if max_rows is not None and len(rows_ids) >= max_rows:
                    return _to_tensors(rows_ids, rows_pos, rows_mask, seq_len)
    return _to_tensors(rows_ids, rows_pos, rows_mask, seq_len)


def _to_tensors(ids, pos, mask, seq_len) -> dict[str, torch.Tensor]:
    shape = (len(ids), seq_len)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int32).reshape(shape),
        "position_ids": torch.tensor(pos, dtype=torch.int32).reshape(shape),
        "loss_mask": torch.tensor(mask, dtype=torch.uint8).reshape(shape),
    }


def build_data(cfg: RunConfig, run_dir: Path) -> Path:
    """The `data` stage. Returns RUN/data; returns at once if it is already complete."""
    from teachers.resolve import load_tokenizer, resolve_teacher, teacher_identity

    out = Path(run_dir) / "data"
    if is_complete(out, "data"):
        return out
    dcfg = cfg.data
    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    tokenizer = load_tokenizer(teacher_dir)
    vocab_size = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]

    domains = sorted({s.domain for s in dcfg.sources})
    total_weight = sum(s.weight for s in dcfg.sources)
    train_parts, heldout_parts, stats = [], [], []
    heldout_done: set[str] = set()
    for i, src in enumerate(dcfg.sources):
        rows = max(1, math.ceil(dcfg.train_tokens * src.weight / total_weight / dcfg.seq_len))
        part = pack(_documents(src, "train", tokenizer, run_dir, dcfg.seed + i), dcfg.seq_len, rows)
        if part["input_ids"].shape[0] < rows:
            print(f"data: source {src.name!r} has only {part['input_ids'].shape[0]} rows of the {rows} "
                  f"its weight asks for; the sampler will repeat them")
        if part["input_ids"].shape[0] == 0:
            raise ValueError(f"data source {src.name!r}: not enough text for one {dcfg.seq_len}-token row")
        part["domain"] = torch.full((part["input_ids"].shape[0],), domains.index(src.domain), dtype=torch.int16)
        train_parts.append(part)
        stats.append({"name": src.name, "kind": src.kind, "domain": src.domain, "weight": src.weight,
                      "train_rows": int(part["input_ids"].shape[0])})
        if src.domain not in heldout_done and dcfg.heldout_sequences_per_domain > 0:
            held = pack(_documents(src, "heldout", tokenizer, run_dir, dcfg.seed),
                        dcfg.seq_len, dcfg.heldout_sequences_per_domain)
            held["domain"] = torch.full((held["input_ids"].shape[0],), domains.index(src.domain), dtype=torch.int16)
            heldout_parts.append(held)
            heldout_done.add(src.domain)
            stats[-1]["heldout_rows"] = int(held["input_ids"].shape[0])

    train = {k: torch.cat([p[k] for p in train_parts]) for k in train_parts[0]}
    heldout = {k: torch.cat([p[k] for p in heldout_parts]) for k in heldout_parts[0]} if heldout_parts else None
    with atomic_dir(out) as tmp:
        save_file(train, str(tmp / "train.safetensors"))
        if heldout is not None:
            save_file(heldout, str(tmp / "heldout.safetensors"))
        write_manifest(
            tmp, "data", config=to_dict(dcfg),
            teacher=teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, vocab_size),
            domains=domains, sources=stats, seq_len=dcfg.seq_len,
            num_train=int(train["input_ids"].shape[0]),
            num_heldout=int(heldout["input_ids"].shape[0]) if heldout is not None else 0,
            train_tokens=int(train["input_ids"].numel()),
            domain_rows={d: int((train["domain"] == j).sum()) for j, d in enumerate(domains)},
        )
    per_source = ", ".join(f"{s['name']}={s['train_rows']}" for s in stats)
    print(f"data: {train['input_ids'].shape[0]} train rows × {dcfg.seq_len} tokens ({per_source}) → {out}")
    return out


def load_split(data_dir: Path, split: str = "train") -> dict[str, np.ndarray]:
    """A packed split (`train` or `heldout`) as numpy arrays."""
    from safetensors.numpy import load_file

    path = Path(data_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise ArtifactError(f"{path}: missing — run the data stage first")
    return load_file(str(path))
