"""Resumable sampling of n teacher completions per prompt.

Results go to an append-only JSONL log, one line per prompt, written and fsynced after every batch of
prompts. A `kill -9` can at worst leave a half-written last line: `JsonlLog.load` cuts it off, and the rerun
samples exactly the prompts whose line is missing, so no prompt is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.config import InputError
from synth_data.prompts import PromptTask


class JsonlLog:
    """An append-only JSONL file of records keyed by `key`, safe against a crash at any byte."""

    def __init__(self, path: Path, key: str = "prompt_id"):
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by key (first occurrence wins); a torn last line from a crash is truncated away."""
        if not self.path.is_file():
            return {}
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        records: dict[str, dict[str, Any]] = {}
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{self.path}:{lineno}: corrupt record ({err}); "
                                 "delete the file to start over") from None
            records.setdefault(str(rec[self.key]), rec)
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records as one write, then fsync: after this returns they survive a crash."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


@dataclass
class GenerationStats:
    """What one `generate_samples` call did: prompts sampled now, completions, tokens, wall seconds."""

    prompts: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0


def generate_samples(tasks: list[PromptTask], prompt_ids: list[list[int]], backend: Any, tokenizer: Any,
                     log: JsonlLog, *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int, batch_prompts: int, progress: bool = True) -> GenerationStats:
    """Sample `n` completions for every task not yet in `log`, `batch_prompts` prompts per backend call.

    `prompt_ids[i]` are the chat-template token ids of `tasks[i]`. Each log line holds `prompt_id`,
    `completions` (decoded text, special tokens dropped), `num_tokens`, `truncated` (hit `max_new_tokens`
    without an end of turn) and `seconds` (this prompt's share of its batch's wall time). The seed of a
    batch is `seed` plus the index of its first prompt, so a rerun samples the same way.
    """
    done = log.load()
    pending = [i for i, t in enumerate(tasks) if t.id not in done]
    stats = GenerationStats()
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="synth: sampling", unit="prompt",
               disable=not progress)
    for start in range(0, len(pending), batch_prompts):
        idx = pending[start:start + batch_prompts]
        t0 = time.perf_counter()
        outs = backend.generate([prompt_ids[i] for i in idx], n=n, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed + idx[0])
        elapsed = time.perf_counter() - t0
        if len(outs) != len(idx) or any(len(o) != n for o in outs):
            raise RuntimeError(f"teacher backend returned {[len(o) for o in outs]} completions for {len(idx)} "
                               f"prompts, expected {n} each")
        records = []
        for i, completions in zip(idx, outs, strict=True):
            records.append({
                "prompt_id": tasks[i].id,
                "completions": [tokenizer.decode(c, skip_special_tokens=True) for c in completions],
                "num_tokens": [len(c) for c in completions],
                "truncated": [len(c) >= max_new_tokens for c in completions],
                "seconds": elapsed / len(idx),
            })
        log.append(records)
        stats.prompts += len(idx)
        stats.samples += sum(len(r["completions"]) for r in records)
        stats.tokens += sum(sum(r["num_tokens"]) for r in records)
        stats.seconds += elapsed
        bar.update(len(idx))
    bar.close()
    return stats
