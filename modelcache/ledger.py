"""The ledger: what each registered model holds, the device room promised to swap-ins in flight,
and which models give way when room is needed. It has no threads and no lock: the cache calls it
with its own lock held, and tests can drive it alone.

Accounting (see docs/design.md): the accounted bytes are the resident models' device bytes, what
parked models keep on the device, what runtimes took on their own, and for each swap-in in flight
``max(its need plus what its victims keep afterwards, the bytes its victims still hold)``, so two
swap-ins never spend the same room.
"""
from __future__ import annotations

import collections
from concurrent.futures import Future
from typing import Any, Deque, Dict, List, Optional, Tuple

from .backends import Backend, Handle
from .errors import ModelTooLargeError
from .policies import Candidate, Policy
from .sizes import format_bytes
from .tiers import EntryInfo, Tier


class Entry:
    """A registered model. Fields are read and written with the cache's lock held."""

    __slots__ = ("name", "loader", "backend_spec", "backend", "options", "pinned", "owner", "handle",
                 "tier", "moving", "moving_to", "evicting_for", "leases", "hits", "misses", "loads",
                 "uses", "tick", "last_used", "swap_in_seconds", "load_seconds", "last_error", "removed",
                 "unpark_after", "move_started", "planned")

    def __init__(self, name: str, loader: Any, backend_spec: Any, options: Dict[str, Any],
                 pinned: bool, owner: Any) -> None:
        self.name = name
        self.loader = loader
        self.backend_spec = backend_spec
        self.backend: Optional[Backend] = None
        self.options = options
        self.pinned = pinned
        self.owner = owner
        self.handle: Optional[Handle] = None
        self.tier = Tier.UNLOADED
        self.moving: Optional[Future[None]] = None         # the move in flight; others wait on it
        self.moving_to: Optional[Tier] = None
        self.evicting_for: Optional[Reservation] = None
        self.leases = self.hits = self.misses = self.loads = self.uses = self.tick = 0
        self.last_used: Optional[float] = None
        self.swap_in_seconds: Optional[float] = None
        self.load_seconds: Optional[float] = None
        self.last_error: Optional[str] = None
        self.removed = False
        self.unpark_after = False    # a victim whose kept device bytes go too (planner's choice)
        self.move_started = 0.0      # perf_counter() when the move in flight began
        #: (need, the part of it beyond the model's own weights, parked bytes) when its swap-in in
        #: flight was given room (None: none in flight); see :attr:`parked_bytes`
        self.planned: Optional[Tuple[int, int, int]] = None

    @property
    def device_bytes(self) -> int:
        handle = self.handle
        if handle is None:
            return 0
        if self.tier is Tier.DEVICE and handle.tier is not Tier.DEVICE:
            # its move down is past the backend, not yet committed: what it keeps stays counted
            return handle.parked_device_bytes()
        return handle.device_bytes

    @property
    def host_bytes(self) -> int:
        return self.handle.host_bytes if self.handle is not None else 0

    @property
    def parked_bytes(self) -> int:
        """Device bytes held while off the device tier. During a swap-in (its reservation answers
        for the need it was given room for) the backend changes the handle before the cache
        commits the move: a session is made, or comes to be carried, and the handle's tier is
        set. Meanwhile this counts what the model kept parked when planned, or what its handle
        holds beyond the need's share for it, whichever is more: on the host the share beyond
        the weights (a session's), on the device the whole need (counted nowhere, or twice, the
        CPU families stress's books went 4-5 % over the budget under load)."""
        handle = self.handle
        if handle is None or self.tier is Tier.DEVICE:
            return 0
        on_device = handle.tier is Tier.DEVICE      # past the backend's move, not yet committed
        held = handle.device_bytes if on_device else handle.parked_device_bytes()
        if self.planned is None:
            return held
        need, shared_need, parked = self.planned
        return max(parked, held - (need if on_device else shared_need))

    def shared_device(self) -> Optional[Tuple[Any, int]]:
        """``(key, bytes)`` of device memory kept for fast swap-ins and shared with the models of
        the same key, on the device or parked (see ``Handle.shared_device``)."""
        if self.handle is None or self.tier not in (Tier.DEVICE, Tier.HOST):
            return None
        return self.handle.shared_device()

    @property
    def freed_by_eviction(self) -> int:
        """Device bytes a move to the host tier frees."""
        return self.device_bytes - (self.handle.kept_after_eviction() if self.handle is not None else 0)

    def need(self) -> Optional[int]:
        """Device bytes this model will add when it moves to the device, if known (asked when
        a swap-in is planned: not meaningful while one is in flight, see :attr:`parked_bytes`)."""
        if self.handle is not None:
            return max(0, self.handle.estimated_device_bytes() - self.parked_bytes)
        return self.options.get("size_hint")

    def firm_need(self) -> int:
        """Device bytes this model adds for certain (no estimates): what :meth:`Ledger.check_fits`
        judges."""
        if self.handle is not None:
            return max(0, self.handle.firm_device_bytes() - self.parked_bytes)
        return int(self.options.get("size_hint") or 0)

    def idle(self) -> bool:
        """Not moving and not leased: a move may start."""
        return self.moving is None and self.leases == 0

    def candidate(self, nbytes: int) -> Candidate:
        reload = self.swap_in_seconds if self.swap_in_seconds is not None else (self.load_seconds or 0.0)
        return Candidate(self.name, nbytes, self.tick, self.uses, reload)

    def snapshot(self) -> EntryInfo:
        """What ``ModelCache.info()`` returns for this entry."""
        spec = self.backend_spec
        return EntryInfo(
            name=self.name, tier=self.tier, device_bytes=self.device_bytes, host_bytes=self.host_bytes,
            disk_path=self.handle.disk_path if self.handle is not None else None, hits=self.hits,
            misses=self.misses, loads=self.loads, leases=self.leases, last_used=self.last_used,
            backend=self.backend.name if self.backend is not None else (
                spec if isinstance(spec, str) else getattr(spec, "name", None)),
            pinned=self.pinned, moving_to=self.moving_to, swap_in_seconds=self.swap_in_seconds,
            last_error=self.last_error, details=self.handle.details() if self.handle is not None else {})


class Reservation:
    """Device room promised to a swap-in in flight. Its victims' bytes count towards it until they
    have left the device, so the accounted total never exceeds the budget at any moment."""

    __slots__ = ("entry", "need", "victims")

    def __init__(self, entry: Entry, need: int, victims: List[Entry]) -> None:
        self.entry, self.need, self.victims = entry, need, victims

    def claim(self) -> int:
        """Bytes the reservation answers for: what its victims still on their way off hold now,
        or what the swap-in takes plus what those victims keep on the device afterwards (an
        evicted model's session stays), whichever is more. A victim whose move ended counts with
        the entries again."""
        now = staying = 0
        for v in self.victims:
            if v.evicting_for is not self:
                continue
            if v.tier is Tier.DEVICE:
                now += v.device_bytes
                if not v.unpark_after and v.handle is not None:
                    staying += v.handle.kept_after_eviction()
            else:
                now += v.parked_bytes
        return max(self.need + staying, now)


class Ledger:
    """Entries, reservations and victim choice for one cache. Sizes are bytes."""

    def __init__(self, policy: Policy, device_budget: int, reserve: int, host_budget: int,
                 total: int, disk: bool) -> None:
        self.policy = policy
        self.device_budget = device_budget
        self.reserve = reserve
        self.host_budget = host_budget
        self.total = total               # the device's total bytes
        self.disk = disk                 # a disk tier exists
        self.entries: Dict[str, Entry] = {}
        self.reservations: List[Reservation] = []
        #: device bytes the process holds beyond the books that runtimes took on their own
        #: (``watcher.RuntimeGrowth``): counted against the budget like a model's
        self.runtime_bytes = 0
        #: swap-ins waiting for room, oldest first: while any waits, newer ones line up behind it
        #: (docs/design.md, "Fairness")
        self.waiting: Deque[object] = collections.deque()

    # accounting ----------------------------------------------------------------------------
    def accounted_bytes(self) -> int:
        """Device bytes the cache answers for: residents (with the working memory of their runs),
        what parked models keep on the device, rooms promised to swap-ins, and what runtimes took
        on their own beyond that (:attr:`runtime_bytes`)."""
        total = sum(e.device_bytes if e.tier is Tier.DEVICE else e.parked_bytes for e in self.entries.values()
                    if e.evicting_for is None)
        return total + sum(r.claim() for r in self.reservations) + self.runtime_bytes

    def quiet(self) -> bool:
        """Nothing moves and no room is promised: the books match the device."""
        return not self.reservations and all(e.moving is None for e in self.entries.values())

    def host_bytes(self) -> int:
        return sum(e.host_bytes for e in self.entries.values())

    def limit(self) -> int:
        """Device bytes models may take at most: the budget, within the device less the reserve."""
        return min(self.device_budget, self.total - self.reserve)

    def check_fits(self, name: str, need: int) -> None:
        """Raise :class:`ModelTooLargeError` if ``need`` is beyond the whole budget."""
        limit = self.limit()
        if need > limit:
            raise ModelTooLargeError(
                f"needs {need} B ({format_bytes(need)}) on the device, more than the whole budget of "
                f"{limit} B ({format_bytes(limit)}; device_budget={self.device_budget} B, "
                f"reserve={self.reserve} B)", model=name)

    # reservations --------------------------------------------------------------------------
    def reserve_room(self, entry: Entry, need: int, victims: List[Entry]) -> Reservation:
        weights = entry.handle.firm_device_bytes() if entry.handle is not None else need
        entry.planned = (need, max(0, need - weights), entry.parked_bytes)
        reservation = Reservation(entry, need, victims)
        for victim in victims:
            victim.evicting_for = reservation
        self.reservations.append(reservation)
        return reservation

    def release_room(self, reservation: Reservation) -> None:
        self.reservations.remove(reservation)
        reservation.entry.planned = None

    # the queue for room -------------------------------------------------------------------
    def first_in_line(self, ticket: Optional[object]) -> bool:
        """Whether a swap-in may look for room now: nobody waits, or it has waited longest."""
        return not self.waiting or self.waiting[0] is ticket

    def wait_in_line(self, ticket: object) -> int:
        """Line ``ticket`` up (once); returns how many wait ahead of it."""
        if ticket not in self.waiting:
            self.waiting.append(ticket)
        return self.waiting.index(ticket)

    def leave_line(self, ticket: object) -> bool:
        """Take ``ticket`` out of the line; True if it was in it."""
        try:
            self.waiting.remove(ticket)
            return True
        except ValueError:
            return False

    # victims -------------------------------------------------------------------------------
    def choose_victims(self, need: int, exclude: Optional[Entry], free_bytes: int,
                       waited_s: Optional[float] = None) -> Optional[List[Entry]]:
        """The victims that make room for ``need`` more device bytes, in policy order, such that
        the accounted bytes stay within the budget and the projected free memory (``free_bytes``
        read now) stays at or above the reserve. None if evicting every evictable model would not
        be enough (see :meth:`pick_victims` for ``waited_s``)."""
        victims, enough = self.pick_victims(need, exclude, free_bytes, waited_s)
        if not enough:
            for victim in victims:
                victim.unpark_after = False
            return None
        for victim in victims:
            self.policy.on_evict(victim.candidate(victim.device_bytes))
        return victims

    def pick_victims(self, need: int, exclude: Optional[Entry], free_bytes: int,
                     waited_s: Optional[float] = None) -> Tuple[List[Entry], bool]:
        """Victims until ``need`` more bytes fit both the budget and the reserve, and whether they
        suffice: resident models in policy order first (evicted), then device memory kept for
        fast swap-ins (a shared session), freed as a whole: every model holding it goes to the
        host and is unparked (``unpark_after`` marks resident ones).

        With ``waited_s`` (how long the request has waited for room), shared memory that takes
        longer than that to make again (``Handle.shared_seconds``: a session, about a second) is
        kept while waiting for leased models (and models on their way in) to be released would
        make the room: a run ends in milliseconds, and dropping a session costs every later
        request of its architecture."""
        # what runtimes took on their own counts only as far as it leaves room for this model
        # alone: a model that fits the budget always gets room by evicting the others
        over_budget = (self.accounted_bytes() - max(0, self.runtime_bytes + need - self.device_budget)
                       + need - self.device_budget)
        pending = sum(r.need for r in self.reservations)
        short_free = self.reserve - (free_bytes - pending - need)
        victims: List[Entry] = []
        freed = 0
        for candidate in self.policy.rank(self.evictable(exclude)):
            if freed >= over_budget and freed >= short_free:
                return victims, True
            victims.append(self.entries[candidate.name])
            freed += candidate.nbytes
        if freed >= over_budget and freed >= short_free:
            return victims, True
        shared = self.droppable_shared(exclude)
        if waited_s is not None and shared:
            # leased models, and models whose swap-in is on its way (leased once there): both
            # evictable once their runs end
            busy = sum(e.freed_by_eviction for e in self.entries.values()
                       if e.tier is Tier.DEVICE and not e.pinned and not e.idle() and e is not exclude
                       and e.evicting_for is None) + sum(r.need for r in self.reservations if not r.entry.pinned)
            if freed + busy >= over_budget and freed + busy >= short_free:      # waiting would do
                shared = [(n, m) for n, m in shared
                          if max((x.handle.shared_seconds() for x in m if x.handle is not None), default=0.0)
                          <= waited_s]
        for nbytes, members in shared:
            if freed >= over_budget and freed >= short_free:
                break
            for member in members:
                if member.tier is Tier.DEVICE and member not in victims:
                    victims.append(member)
                    freed += member.freed_by_eviction
                elif member not in victims:
                    victims.append(member)          # parked: moved to the host tier, i.e. unparked
                member.unpark_after = member.tier is Tier.DEVICE
            freed += nbytes
        return victims, freed >= over_budget and freed >= short_free

    def shared_leaving(self, entry: Entry) -> bool:
        """Whether device memory kept for fast swap-ins that ``entry``'s swap-in would use (its
        architecture's session) is being freed (another model holding it is unparked for room or
        moves below the host): planned now, the swap-in would count on it staying (and keep it,
        taking room promised to another), so it is planned once that memory has gone."""
        key = entry.handle.shared_key() if entry.handle is not None else None
        if key is None:
            return False
        return any(e is not entry and e.moving is not None and e.handle is not None and self._drops_shared(e)
                   and e.handle.shared_key() == key for e in self.entries.values())

    @staticmethod
    def _drops_shared(entry: Entry) -> bool:
        """Whether ``entry``'s move lets go of the shared memory it holds: below the host, or
        to the host unparked (a parked model evicted, a resident one with ``unpark_after``)."""
        target = entry.moving_to
        return target in (Tier.DISK, Tier.UNLOADED) or (
            target is Tier.HOST and (entry.tier is Tier.HOST or entry.unpark_after))

    def evictable(self, exclude: Optional[Entry] = None) -> List[Candidate]:
        return [e.candidate(e.freed_by_eviction) for e in self.entries.values()
                if e.tier is Tier.DEVICE and e.idle() and not e.pinned and e is not exclude]

    def droppable_shared(self, exclude: Optional[Entry] = None) -> List[Tuple[int, List[Entry]]]:
        """Device memory kept for fast swap-ins that can be freed now, ``(bytes, the models holding
        it)``, least valuable first (policy order of its most valuable holder): held only by idle,
        unpinned models, and not what ``exclude``'s swap-in or one in flight will use."""
        held: Dict[Any, Tuple[int, List[Entry]]] = {}
        for e in self.entries.values():
            shared = e.shared_device()
            if shared is not None:
                key, nbytes = shared
                held.setdefault(key, (nbytes, []))[1].append(e)
        needed = {r.entry.handle.shared_key() for r in self.reservations if r.entry.handle is not None}
        if exclude is not None and exclude.handle is not None:
            needed.add(exclude.handle.shared_key())
        droppable = {key: (nbytes, members) for key, (nbytes, members) in held.items()
                     if nbytes > 0 and key not in needed
                     and all(m.idle() and not m.pinned and m is not exclude for m in members)}
        if not droppable:
            return []
        best = {key: max(members, key=lambda m: m.tick) for key, (_, members) in droppable.items()}
        by_name = {best[key].name: key for key in droppable}
        ranked = self.policy.rank([best[key].candidate(droppable[key][0]) for key in droppable])
        return [droppable[by_name[c.name]] for c in ranked]

    def eviction_target(self, entry: Entry) -> Tier:
        """Host (for a parked model: stay there, unparked), unless the model alone is larger than
        the host budget."""
        assert entry.handle is not None
        if entry.tier is Tier.HOST or entry.handle.estimated_host_bytes() <= self.host_budget:
            return Tier.HOST
        return self.below_host(entry)

    def below_host(self, entry: Entry) -> Tier:
        backend = entry.backend
        if self.disk and backend is not None and backend.supports_disk:
            return Tier.DISK
        return Tier.UNLOADED

    def host_victims(self, keep: Optional[Entry]) -> List[Entry]:
        """Parked models (policy order) to demote below the host until the host bytes fit."""
        over = self.host_bytes() - self.host_budget
        if over <= 0:
            return []
        candidates = [e.candidate(e.host_bytes) for e in self.entries.values()
                      if e.tier is Tier.HOST and e.idle() and e is not keep]
        victims = []
        for candidate in self.policy.rank(candidates):
            if over <= 0:
                break
            victims.append(self.entries[candidate.name])
            over -= candidate.nbytes
        return victims

    def busy_reason(self, need: int, timeout: Optional[float], free_bytes: int, max_swap_ins: Optional[int],
                    ahead: int = 0) -> str:
        """Why no room was found, for :class:`DeviceBusyError`."""
        leased = sorted(e.name for e in self.entries.values() if e.tier is Tier.DEVICE and e.leases)
        pinned = sorted(e.name for e in self.entries.values() if e.tier is Tier.DEVICE and e.pinned)
        held = f"leased: {leased or 'none'}; pinned: {pinned or 'none'}"
        if ahead:
            return (f"no room for {need} B on the device after {timeout} s: {ahead} older request(s) still "
                    f"wait for room ahead of it; {held}")
        if max_swap_ins is not None and len(self.reservations) >= max_swap_ins:
            return (f"no swap-in slot after {timeout} s: {len(self.reservations)} swap-ins in flight, "
                    f"max_swap_ins={max_swap_ins}")
        return (f"no room for {need} B on the device after {timeout} s: {self.accounted_bytes()} B of the "
                f"{self.device_budget} B budget in use or promised, {free_bytes} B free "
                f"against a reserve of {self.reserve} B; {held}")
