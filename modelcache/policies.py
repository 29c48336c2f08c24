"""Eviction policies. They differ only in the order in which they give up resident models.

The cache builds a :class:`Candidate` for every model it may evict (unleased, unpinned,
not moving) and asks :meth:`Policy.rank` for the order; it then evicts from the front until
there is room. A new policy is one subclass in this file (or in user code) passed as
``ModelCache(policy=MyPolicy())``.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Union

from .errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """What a policy may look at. Sizes are bytes, times seconds."""

    name: str
    nbytes: int            #: bytes the eviction would free in the tier being made room in
    last_used: int         #: logical clock of the last lease (larger is more recent)
    uses: int              #: leases granted so far
    reload_seconds: float  #: measured time to bring it back (last swap-in, else last load)


class Policy(ABC):
    """Decides which models leave first. Hooks are called with the cache's lock held: keep them cheap."""

    name = "policy"

    @abstractmethod
    def rank(self, candidates: Sequence[Candidate]) -> List[Candidate]:
        """Return ``candidates`` in eviction order: the first is given up first."""

    def on_use(self, candidate: Candidate) -> None:
        """A lease was granted on the model."""

    def on_evict(self, candidate: Candidate) -> None:
        """The model was chosen as a victim."""

    def on_remove(self, name: str) -> None:
        """The model was unregistered."""


class LRUPolicy(Policy):
    """Least recently used goes first."""

    name = "lru"

    def rank(self, candidates: Sequence[Candidate]) -> List[Candidate]:
        return sorted(candidates, key=lambda c: c.last_used)


class LFUPolicy(Policy):
    """Least frequently used goes first; ties go to the least recently used."""

    name = "lfu"

    def rank(self, candidates: Sequence[Candidate]) -> List[Candidate]:
        return sorted(candidates, key=lambda c: (c.uses, c.last_used))


class CostPolicy(Policy):
    """GreedyDual-Size-Frequency: priority = clock + uses x reload_seconds / bytes.

    Models that are cheap to bring back, large, or rarely used go first; the clock rises to
    each victim's priority so that long-unused models age out.
    """

    name = "cost"

    def __init__(self) -> None:
        self._clock = 0.0
        self._priority: Dict[str, float] = {}
        self._lock = threading.Lock()

    def _value(self, c: Candidate) -> float:
        return max(c.uses, 1) * max(c.reload_seconds, 1e-6) / max(c.nbytes, 1)

    def on_use(self, candidate: Candidate) -> None:
        with self._lock:
            self._priority[candidate.name] = self._clock + self._value(candidate)

    def on_evict(self, candidate: Candidate) -> None:
        with self._lock:
            self._clock = max(self._clock, self._priority.get(candidate.name, self._clock))

    def on_remove(self, name: str) -> None:
        with self._lock:
            self._priority.pop(name, None)

    def priority(self, candidate: Candidate) -> float:
        with self._lock:
            return self._priority.get(candidate.name, self._clock + self._value(candidate))

    def rank(self, candidates: Sequence[Candidate]) -> List[Candidate]:
        return sorted(candidates, key=lambda c: (self.priority(c), c.last_used))


POLICIES: Dict[str, Callable[[], Policy]] = {"lru": LRUPolicy, "lfu": LFUPolicy, "cost": CostPolicy}


def make_policy(policy: Union[str, Policy, None]) -> Policy:
    """``"lru"``, ``"lfu"``, ``"cost"``, or a :class:`Policy` instance."""
    if policy is None:
        return LRUPolicy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy.lower() in POLICIES:
        return POLICIES[policy.lower()]()
    raise ConfigError(f"policy={policy!r} is unknown; use one of {sorted(POLICIES)} or a Policy instance")
