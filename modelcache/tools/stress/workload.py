"""Request traces for stress runs, and the offline optimum (Belady) hit rate of a trace."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import ConfigError


def zipf_weights(n: int, s: float) -> List[float]:
    """Popularity of ranks 1..n under Zipf with exponent ``s`` (normalised)."""
    if n < 1 or s < 0:
        raise ConfigError(f"zipf needs n >= 1 and s >= 0 (got n={n}, s={s})")
    raw = [1.0 / (rank ** s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def make_trace(names: Sequence[str], requests: int, kind: str = "zipf", s: float = 1.1,
               seed: int = 0) -> List[str]:
    """``requests`` model names drawn from ``names``: ``"zipf"`` (exponent ``s``; popularity
    ranks are a seeded shuffle of ``names``, so popularity is independent of size) or
    ``"uniform"``."""
    if not names:
        raise ConfigError("a trace needs at least one model name")
    if requests < 0:
        raise ConfigError(f"requests={requests} must be >= 0")
    rng = random.Random(seed)
    if kind == "uniform":
        return [rng.choice(list(names)) for _ in range(requests)]
    if kind != "zipf":
        raise ConfigError(f"workload {kind!r} is unknown; use 'zipf', 'uniform' or a trace file")
    ranked = list(names)
    rng.shuffle(ranked)
    return rng.choices(ranked, weights=zipf_weights(len(ranked), s), k=requests)


def read_trace(path: str, known: Optional[Sequence[str]] = None) -> List[str]:
    """A trace file: one model name per line; blank lines and ``#`` comments are skipped."""
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            name = line.split("#", 1)[0].strip()
            if not name:
                continue
            if known is not None and name not in known:
                raise ConfigError(f"{path}:{number}: unknown model {name!r}")
            out.append(name)
    if not out:
        raise ConfigError(f"{path}: the trace has no requests")
    return out


def belady_hits(trace: Sequence[str], sizes: Dict[str, int], capacity: int) -> int:
    """Hits of the offline policy that, on a miss, evicts the resident models used furthest in the
    future (never-again first) until the new one fits. With equal sizes this is Belady's MIN,
    the optimum; with mixed sizes the optimum is NP-hard and this is the standard
    furthest-in-future heuristic. Models larger than ``capacity`` always miss."""
    next_use = _next_uses(trace)
    resident: Dict[str, float] = {}   # name -> next use index (inf: never again)
    used = 0
    hits = 0
    for i, name in enumerate(trace):
        if name in resident:
            hits += 1
            resident[name] = next_use[i]
            continue
        size = sizes[name]
        if size > capacity:
            continue
        while used + size > capacity:
            victim = max(resident, key=lambda n: resident[n])
            used -= sizes[victim]
            del resident[victim]
        resident[name] = next_use[i]
        used += size
    return hits


def brute_force_hits(trace: Sequence[str], sizes: Dict[str, int], capacity: int) -> int:
    """The true optimum (demand loading: on a miss the model is loaded, evicting any set of
    residents that makes it fit), by exhaustive search. For small traces in tests."""
    from functools import lru_cache
    from itertools import combinations

    @lru_cache(maxsize=None)
    def best(i: int, resident: Tuple[str, ...]) -> int:
        if i == len(trace):
            return 0
        name = trace[i]
        if name in resident:
            return 1 + best(i + 1, resident)
        if sizes[name] > capacity:
            return best(i + 1, resident)
        options = []
        for k in range(len(resident) + 1):
            for evicted in combinations(resident, k):
                keep = tuple(sorted(set(resident) - set(evicted)))
                if sum(sizes[n] for n in keep) + sizes[name] <= capacity:
                    options.append(best(i + 1, tuple(sorted(keep + (name,)))))
        return max(options)

    return best(0, ())


def _next_uses(trace: Sequence[str]) -> List[float]:
    nxt: List[float] = [0.0] * len(trace)
    last: Dict[str, float] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], float("inf"))
        last[trace[i]] = i
    return nxt
