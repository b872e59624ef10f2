"""Dataset-level filters for synthetic samples: exact and near-duplicate removal (MinHash LSH).

Both work on a text per sample (the caller passes prompt + answer). Exact duplicates compare a normalised
form (lower-case, collapsed whitespace). Near duplicates compare sets of word 5-gram shingles: MinHash
signatures (64 permutations) bucketed by LSH (16 bands × 4 rows) propose candidate pairs, and a candidate
is dropped when its exact shingle Jaccard similarity with an already kept sample reaches the threshold.
The first occurrence is always the one kept, so results are deterministic for a given order.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from synth_data.decontam import words

SHINGLE = 5
NUM_PERM = 64
BANDS = 16
_PRIME = (1 << 61) - 1


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_duplicates(texts: list[str]) -> list[bool]:
    """`[N]` flags: True where the normalised text already appeared earlier in the list."""
    seen: set[str] = set()
    flags = []
    for text in texts:
        key = hashlib.sha1(normalise(text).encode()).hexdigest()
        flags.append(key in seen)
        seen.add(key)
    return flags


def shingles(text: str, k: int = SHINGLE) -> set[int]:
    """Word k-gram shingles as 32-bit hashes (a text shorter than k words is one shingle)."""
    w = words(text)
    grams = [" ".join(w[i:i + k]) for i in range(max(1, len(w) - k + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams}


class MinHasher:
    """MinHash signatures with universal hashes (a·x + b) mod (2^61 − 1); a < 2^31 and x < 2^32 keep
    every product inside uint64."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)

    def signature(self, shingle_set: set[int]) -> np.ndarray:
        """uint64 `[num_perm]` minimum hash per permutation."""
        x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
        hashed = (x[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(_PRIME)
        return hashed.min(axis=0)


def near_duplicates(texts: list[str], threshold: float = 0.8) -> list[bool]:
    """`[N]` flags: True where a text's shingle Jaccard similarity with an earlier kept text is ≥ threshold.

    `threshold >= 1.0` turns the filter off (exact duplicates are `exact_duplicates`' job).
    """
    if threshold >= 1.0:
        return [False] * len(texts)
    hasher = MinHasher()
    rows = NUM_PERM // BANDS
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    kept_shingles: dict[int, set[int]] = {}
    flags = []
    for i, text in enumerate(texts):
        sh = shingles(text)
        sig = hasher.signature(sh)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(BANDS)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        dup = any(_jaccard(sh, kept_shingles[j]) >= threshold for j in candidates)
        flags.append(dup)
        if not dup:
            kept_shingles[i] = sh
            for key in keys:
                buckets[key].append(i)
    return flags


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
