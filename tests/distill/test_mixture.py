"""The mixture sampler: realised mix vs weights, determinism, exact resume, disjoint ranks."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import RunConfig, SourceConfig
from distill.mixture import (
    MixtureSampler,
    domain_weights,
    mix_error,
    realised_mix,
    uniform,
    upsampled_weights,
)

NAMES = ["code", "general", "math"]
WEIGHTS = {"general": 0.5, "math": 0.3, "code": 0.2}


def _domains(seed: int = 0) -> np.ndarray:
    """1000 sequences with domain sizes that do not match the weights (so the sampler must reweight)."""
    d = np.array([0] * 100 + [1] * 700 + [2] * 200)
    return np.random.default_rng(seed).permutation(d)


def test_realised_mix_matches_weights():
    domains = _domains()
    sampler = MixtureSampler(domains, NAMES, WEIGHTS, seed=3)
    mix = realised_mix(sampler.take(20_000), domains, NAMES)
    # 20k i.i.d. draws: the standard error of a share is ≤ 0.0036, so 0.015 is > 4 sigma.
    assert mix_error(mix, WEIGHTS) < 0.015, mix
    assert sampler.weights == pytest.approx(WEIGHTS)


def test_each_epoch_of_a_domain_is_a_permutation():
    domains = _domains()
    sampler = MixtureSampler(domains, NAMES, {"code": 1.0}, seed=1)
    code = np.flatnonzero(domains == 0)
    first, second = sampler.take(100), sampler.take(100)
    assert sorted(first) == sorted(code) and sorted(second) == sorted(code)
    assert not np.array_equal(first, second)  # reshuffled each epoch


def test_zero_weight_domain_is_never_drawn():
    domains = _domains()
    drawn = MixtureSampler(domains, NAMES, {"general": 1.0, "math": 1.0, "code": 0.0}, seed=0).take(3000)
    assert not (domains[drawn] == 0).any()


def test_deterministic_and_seed_dependent():
    domains = _domains()
    a = MixtureSampler(domains, NAMES, WEIGHTS, seed=7).take(500)
    b = MixtureSampler(domains, NAMES, WEIGHTS, seed=7).take(500)
    c = MixtureSampler(domains, NAMES, WEIGHTS, seed=8).take(500)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert uniform(7, 10) == uniform(7, 10) != uniform(7, 11)


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_is_exact(world_size):
    domains = _domains()
    for rank in range(world_size):
        full = MixtureSampler(domains, NAMES, WEIGHTS, seed=5, rank=rank, world_size=world_size).take(1500)
        first = MixtureSampler(domains, NAMES, WEIGHTS, seed=5, rank=rank, world_size=world_size)
        head = first.take(617)  # mid-epoch for every domain
        state = first.state_dict()
        resumed = MixtureSampler(domains, NAMES, WEIGHTS, seed=5, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        assert np.array_equal(np.concatenate([head, resumed.take(1500 - 617)]), full)


def test_state_is_rank_independent_and_survives_a_world_size_change():
    """Saved on rank 0 of 2, resumed on 1 process: the single process continues the same global stream."""
    domains = _domains()
    r0 = MixtureSampler(domains, NAMES, WEIGHTS, seed=2, rank=0, world_size=2)
    r1 = MixtureSampler(domains, NAMES, WEIGHTS, seed=2, rank=1, world_size=2)
    r0.take(100)
    r1.take(100)
    assert r0.state_dict() == r1.state_dict()
    single = MixtureSampler(domains, NAMES, WEIGHTS, seed=2)
    reference = single.take(400)[200:]
    resumed = MixtureSampler(domains, NAMES, WEIGHTS, seed=2)
    resumed.load_state_dict(r0.state_dict())
    assert np.array_equal(resumed.take(200), reference)


def test_ranks_are_disjoint_and_cover_the_single_process_stream():
    domains = _domains()
    world = 4
    per_rank = [MixtureSampler(domains, NAMES, WEIGHTS, seed=9, rank=r, world_size=world).take(50)
                for r in range(world)]
    single = MixtureSampler(domains, NAMES, WEIGHTS, seed=9).take(50 * world)
    # Round k hands global draw k*world + r to rank r.
    assert np.array_equal(np.stack(per_rank, axis=1).reshape(-1), single)
    # 200 draws stay inside the first epoch of every domain, so no index may repeat anywhere.
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == union.size
    for step in range(50):  # and never the same index on two ranks at one step
        assert len({int(p[step]) for p in per_rank}) == world


def test_resume_with_new_weights_continues_domain_positions():
    """The annealing stage resumes the main run's position with upsampled weights: no sequence of a domain
    is repeated before that domain's epoch ends."""
    domains = _domains()
    main = MixtureSampler(domains, NAMES, WEIGHTS, seed=4)
    seen = main.take(300)
    anneal = MixtureSampler(domains, NAMES, upsampled_weights(WEIGHTS, {"math": 3.0}), seed=4)
    anneal.load_state_dict(main.state_dict())
    later = anneal.take(100)
    math_seen = seen[domains[seen] == 2]
    math_later = later[domains[later] == 2]
    assert math_seen.size + math_later.size <= 200  # still within math's first epoch
    assert not set(math_seen.tolist()) & set(math_later.tolist())


def test_load_state_rejects_another_seed_or_domains():
    domains = _domains()
    state = MixtureSampler(domains, NAMES, WEIGHTS, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler(domains, NAMES, WEIGHTS, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="domains"):
        MixtureSampler(domains, ["a", "b", "c"], {"a": 1.0}, seed=1).load_state_dict(state)


def test_bad_weights_are_named():
    domains = _domains()
    with pytest.raises(ValueError, match="poetry"):
        MixtureSampler(domains, NAMES, {"poetry": 1.0}, seed=0)
    with pytest.raises(ValueError, match="no training sequences"):
        MixtureSampler(np.zeros(10, dtype=int), NAMES, {"math": 1.0}, seed=0)
    with pytest.raises(ValueError, match="rank"):
        MixtureSampler(domains, NAMES, WEIGHTS, seed=0, rank=2, world_size=2)


def test_domain_weights_and_upsampling():
    cfg = RunConfig()
    cfg.data.sources = [
        SourceConfig(name="wiki", domain="general", weight=0.3),
        SourceConfig(name="books", domain="general", weight=0.2),
        SourceConfig(name="math", domain="math", weight=0.3),
        SourceConfig(name="code", domain="code", weight=0.2),
    ]
    w = domain_weights(cfg, {"domains": NAMES})
    assert w == pytest.approx({"general": 0.5, "math": 0.3, "code": 0.2})
    up = upsampled_weights(w, {"math": 3.0, "code": 3.0})
    assert up == pytest.approx({"general": 0.5 / 2.0, "math": 0.9 / 2.0, "code": 0.6 / 2.0})
    with pytest.raises(ValueError, match="math"):
        domain_weights(cfg, {"domains": ["general", "code"]})
    with pytest.raises(ValueError, match="poetry"):
        upsampled_weights(w, {"poetry": 2.0})


def test_replay_recovers_what_all_ranks_drew():
    from distill.mixture import replay

    domains = _domains()
    ranks = [MixtureSampler(domains, NAMES, WEIGHTS, seed=6, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.take(10)
    start = ranks[0].state_dict()
    drawn = np.stack([s.take(40) for s in ranks], axis=1).reshape(-1)
    assert np.array_equal(replay(domains, NAMES, WEIGHTS, 6, start, ranks[1].state_dict()), drawn)
    assert replay(domains, NAMES, WEIGHTS, 6, None, start).size == 20
