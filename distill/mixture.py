"""The data mixture: which training sequence each rank sees next, drawn by domain weight.

One global stream of draws g = 0, 1, 2, ... is defined by the seed alone. Draw g picks a domain with
probability ∝ its weight, from a counter-based hash of (seed, g) (so no RNG state has to be saved), then takes
the next index in that domain's shuffled order; each domain is reshuffled at every epoch of its own. Rank r of
W gets the draws g ≡ r (mod W): round k hands draws kW … kW+W-1 to ranks 0 … W-1. Every rank computes the
whole stream (the domain choice costs a hash), so all ranks agree on each domain's position and never take
the same position of a domain's order: within an epoch of a domain, no two draws — on any ranks — return
the same sequence.

The state is a handful of integers: the next global draw (a multiple of the world size, identical on every
rank) and how many draws each domain has served. It resumes mid-epoch exactly, and a state saved with one
world size resumes with another (the stream is global). Weights may change between save and resume (the
annealing stage continues the main run's data position with upsampled weights); the seed and domains may not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from core.config import InputError, RunConfig

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One SplitMix64 output for state x: a fast, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, counter): the counter-based RNG of the mixture."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (counter & _MASK64)) >> 11) / float(1 << 53)


class MixtureSampler(Iterator[int]):
    """Endless iterator of global train-sequence indices for one rank, mixed by domain weight.

    `domains` is `[N]` ints: the domain index of train sequence i (`core.packed.PackedRows(RUN/data).domain`);
    `domain_names[j]` names domain j; `weights` maps a name to a non-negative weight (missing: 0). A domain
    with positive weight must have at least one sequence.
    """

    def __init__(self, domains: np.ndarray, domain_names: Sequence[str], weights: dict[str, float], seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        domains = np.asarray(domains)
        if domains.ndim != 1:
            raise InputError(f"mixture: domains must be a 1-D array of domain indices, got shape {domains.shape}")
        if not 0 <= rank < world_size:
            raise InputError(f"mixture: rank {rank} is not in [0, world_size={world_size})")
        unknown = set(weights) - set(domain_names)
        if unknown:
            raise InputError(f"mixture: weights name unknown domains {sorted(unknown)} (data has {list(domain_names)})")
        self.domain_names = list(domain_names)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        # int32 indices while they fit: half the memory of flatnonzero's int64 for these O(rows) arrays and
        # their shuffled copies; the permutation depends only on the length, so the draws are the same.
        index_dtype = np.int32 if domains.size <= np.iinfo(np.int32).max else np.int64
        self.members = [np.flatnonzero(domains == j).astype(index_dtype)
                        for j in range(len(self.domain_names))]
        w = np.array([float(weights.get(name, 0.0)) for name in self.domain_names])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise InputError(f"mixture: weights must be finite, >= 0 and not all 0, got {weights}")
        for name, weight, members in zip(self.domain_names, w, self.members, strict=True):
            if weight > 0 and members.size == 0:
                raise InputError(f"mixture: domain {name!r} has weight {weight} but no training sequences")
        self.weights = {name: float(x) for name, x in zip(self.domain_names, w / w.sum(), strict=True)}
        self._cdf = np.cumsum(w / w.sum())
        self._cdf[-1] = 1.0  # guard against rounding: u < 1 always lands in a domain
        self._draw = 0  # next global draw; always a multiple of world_size between rounds
        self._consumed = [0] * len(self.domain_names)  # draws served per domain, over all ranks
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # domain → (epoch, shuffled member indices)

    # -- the stream -------------------------------------------------------------------------------------

    def domain_of(self, draw: int) -> int:
        """The domain index that global draw `draw` picks."""
        return int(np.searchsorted(self._cdf, uniform(self.seed, draw), side="right"))

    def _order(self, domain: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(domain)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, domain, epoch])
            cached = (epoch, rng.permutation(self.members[domain]))
            self._orders[domain] = cached
        return cached[1]

    def _take(self, draw: int) -> int:
        domain = self.domain_of(draw)
        position = self._consumed[domain]
        self._consumed[domain] += 1
        size = self.members[domain].size
        return int(self._order(domain, position // size)[position % size])

    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> int:
        """The next index for this rank: play one round of world_size draws, keep this rank's."""
        mine = -1
        for r in range(self.world_size):
            index = self._take(self._draw + r)
            if r == self.rank:
                mine = index
        self._draw += self.world_size
        return mine

    def take(self, n: int) -> np.ndarray:
        """The next `n` indices for this rank as an int64 array `[n]`."""
        return np.fromiter((next(self) for _ in range(n)), dtype=np.int64, count=n)

    # -- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The data position: JSON-serialisable, the same on every rank."""
        return {
            "seed": self.seed,
            "draw": self._draw,
            "consumed": dict(zip(self.domain_names, self._consumed, strict=True)),
            "world_size": self.world_size,
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`. The seed and domain names must match; the world size and weights may
        differ (the position is global)."""
        if int(state["seed"]) != self.seed:
            raise InputError(f"mixture state: saved with seed {state['seed']}, this sampler has seed {self.seed}")
        consumed = state["consumed"]
        if set(consumed) != set(self.domain_names):
            raise InputError(f"mixture state: saved for domains {sorted(consumed)}, data has {self.domain_names}")
        self._draw = int(state["draw"])
        self._consumed = [int(consumed[name]) for name in self.domain_names]


# -------------------------------------------------------------------------------------------------------
# Weights from the config, and the realised mix
# -------------------------------------------------------------------------------------------------------


def domain_weights(cfg: RunConfig, data_manifest: dict[str, Any]) -> dict[str, float]:
    """Per-domain sampling weights: the sum of `cfg.data.sources[*].weight` per domain, normalised to 1.

    Every domain with positive weight must exist in the data artifact (`data_manifest["domains"]`)."""
    totals: dict[str, float] = {}
    for src in cfg.data.sources:
        totals[src.domain] = totals.get(src.domain, 0.0) + float(src.weight)
    available = list(data_manifest.get("domains") or [])
    missing = [d for d, w in totals.items() if w > 0 and d not in available]
    if missing:
        raise InputError(f"data.sources: domains {missing} are not in the data artifact (it has {available}); "
                         "rebuild it with `distill data`")
    total = sum(totals.values())
    if total <= 0:
        raise InputError("data.sources: the source weights sum to 0")
    return {d: totals.get(d, 0.0) / total for d in available}


def upsampled_weights(weights: dict[str, float], factors: dict[str, float]) -> dict[str, float]:
    """`weights` × per-domain `factors` (missing: ×1), renormalised; a factor for an unknown domain is an error."""
    unknown = set(factors) - set(weights)
    if unknown:
        raise InputError(f"anneal.upsample: unknown domains {sorted(unknown)} (data has {sorted(weights)})")
    raw = {d: w * float(factors.get(d, 1.0)) for d, w in weights.items()}
    total = sum(raw.values())
    if total <= 0:
        raise InputError(f"anneal.upsample: upsampled weights {raw} sum to 0")
    return {d: w / total for d, w in raw.items()}


def realised_mix(indices: Sequence[int] | np.ndarray, domains: np.ndarray,
                 domain_names: Sequence[str]) -> dict[str, float]:
    """The share of each domain among the drawn `indices` (global train-sequence indices), e.g. for logging
    against the configured weights."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return {name: 0.0 for name in domain_names}
    counts = np.bincount(np.asarray(domains)[idx].astype(np.int64), minlength=len(domain_names))
    return {name: float(c) / idx.size for name, c in zip(domain_names, counts, strict=True)}


def replay(domains: np.ndarray, domain_names: Sequence[str], weights: dict[str, float], seed: int,
           start: dict[str, Any] | None, end: dict[str, Any]) -> np.ndarray:
    """The global indices drawn, over all ranks, between two sampler states (`state_dict()`s; `start` None:
    the beginning) — e.g. to report the realised mix of a training phase from its first and last checkpoint.
    `weights` must be the ones used between the two states."""
    sampler = MixtureSampler(domains, domain_names, weights, seed)
    if start is not None:
        sampler.load_state_dict(start)
    return sampler.take(int(end["draw"]) - sampler.state_dict()["draw"])


def mix_error(realised: dict[str, float], weights: dict[str, float]) -> float:
    """Largest absolute difference between a realised mix and the target weights (total-variation style)."""
    return max(abs(realised.get(d, 0.0) - weights.get(d, 0.0)) for d in set(realised) | set(weights))
