import collections
import itertools
import random

import pytest

import modelcache as mc
from modelcache.tools.stress.workload import belady_hits, brute_force_hits, make_trace, read_trace, zipf_weights

NAMES = [f"m{i}" for i in range(10)]


def test_zipf_is_skewed_seeded_and_size_independent():
    trace = make_trace(NAMES, 20000, "zipf", s=1.1, seed=3)
    counts = collections.Counter(trace)
    top = counts.most_common()
    weights = zipf_weights(10, 1.1)
    assert abs(top[0][1] / 20000 - weights[0]) < 0.02 and abs(top[-1][1] / 20000 - weights[-1]) < 0.01
    assert make_trace(NAMES, 100, "zipf", seed=3) == trace[:100]
    assert make_trace(NAMES, 100, "zipf", seed=4) != trace[:100]
    ranks = {seed: collections.Counter(make_trace(NAMES, 5000, seed=seed)).most_common(1)[0][0] for seed in range(6)}
    assert len(set(ranks.values())) > 1      # the most popular model depends on the seed, not the name order


def test_uniform_and_errors(tmp_path):
    counts = collections.Counter(make_trace(NAMES, 20000, "uniform", seed=1))
    assert set(counts) == set(NAMES) and max(counts.values()) / min(counts.values()) < 1.2
    with pytest.raises(mc.ConfigError, match="workload"):
        make_trace(NAMES, 10, "bursty")
    with pytest.raises(mc.ConfigError):
        make_trace([], 10)
    with pytest.raises(mc.ConfigError):
        zipf_weights(3, -1)
    path = tmp_path / "trace.txt"
    path.write_text("# a replayed trace\nm1\n\nm2  # comment\nm1\n")
    assert read_trace(str(path), NAMES) == ["m1", "m2", "m1"]
    path.write_text("m1\nnope\n")
    with pytest.raises(mc.ConfigError, match=":2: unknown model 'nope'"):
        read_trace(str(path), NAMES)


def test_belady_matches_brute_force_with_equal_sizes():
    rng = random.Random(0)
    for _ in range(40):
        names = [f"m{i}" for i in range(rng.randint(2, 5))]
        trace = [rng.choice(names) for _ in range(rng.randint(1, 12))]
        sizes = {n: 1 for n in names}
        capacity = rng.randint(1, len(names))
        assert belady_hits(trace, sizes, capacity) == brute_force_hits(trace, sizes, capacity), (trace, capacity)


def test_belady_with_mixed_sizes_is_feasible_and_near_optimal():
    rng = random.Random(1)
    gaps = []
    for _ in range(40):
        names = [f"m{i}" for i in range(rng.randint(2, 5))]
        trace = [rng.choice(names) for _ in range(rng.randint(1, 10))]
        sizes = {n: rng.randint(1, 4) for n in names}
        capacity = rng.randint(1, 8)
        heuristic, optimum = belady_hits(trace, sizes, capacity), brute_force_hits(trace, sizes, capacity)
        assert heuristic <= optimum
        gaps.append(optimum - heuristic)
    assert sum(gaps) <= len(gaps) // 2      # rarely below the optimum, and then by little


def test_belady_beats_lru_on_a_looping_trace():
    trace = list(itertools.chain.from_iterable(["a", "b", "c"] for _ in range(5)))
    sizes = {"a": 1, "b": 1, "c": 1}
    lru, resident = 0, []
    for name in trace:
        if name in resident:
            lru += 1
            resident.remove(name)
        elif len(resident) == 2:
            resident.pop(0)
        resident.append(name)
    assert lru == 0
    assert belady_hits(trace, sizes, 2) == brute_force_hits(trace, sizes, 2) == 6
