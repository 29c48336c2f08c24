"""The ledger alone: accounting, reservations and victim choice, with no cache and no threads."""
import pytest

import modelcache as mc
from modelcache.backends.base import Handle
from modelcache.ledger import Entry, Ledger
from modelcache.policies import LRUPolicy


class FakeHandle(Handle):
    def __init__(self, name, tier, nbytes, kept=0):
        super().__init__(name, tier)
        self.nbytes, self.kept = nbytes, kept
        self.seconds = 0.0
        self.device_bytes = nbytes if tier is mc.Tier.DEVICE else 0
        self.host_bytes = nbytes

    def estimated_device_bytes(self):
        return self.nbytes

    def parked_device_bytes(self):
        return self.kept

    def kept_after_eviction(self):
        return self.kept

    def shared_seconds(self):
        return self.seconds


def make_ledger(budget=1000, reserve=0, host_budget=10_000, total=2000):
    return Ledger(LRUPolicy(), budget, reserve, host_budget, total, disk=False)


def add(ledger, name, tier, nbytes, tick, kept=0, leases=0):
    entry = Entry(name, None, "auto", {}, False, None)
    entry.handle, entry.tier, entry.tick, entry.leases = FakeHandle(name, tier, nbytes, kept), tier, tick, leases
    ledger.entries[name] = entry
    return entry


def test_victims_in_policy_order_until_the_need_fits():
    ledger = make_ledger(budget=1000)
    for i, name in enumerate(["a", "b", "c", "d"]):
        add(ledger, name, mc.Tier.DEVICE, 250, tick=i)
    ledger.entries["a"].tick = 10          # a used last: b goes first
    assert ledger.accounted_bytes() == 1000
    victims = ledger.choose_victims(300, exclude=None, free_bytes=1000)
    assert [v.name for v in victims] == ["b", "c"]
    assert ledger.choose_victims(100, exclude=None, free_bytes=1000)[0].name == "b"


def test_leased_models_are_not_victims_and_too_little_room_is_none():
    ledger = make_ledger(budget=500)
    add(ledger, "a", mc.Tier.DEVICE, 250, tick=0, leases=1)
    add(ledger, "b", mc.Tier.DEVICE, 250, tick=1)
    assert [v.name for v in ledger.choose_victims(200, None, free_bytes=2000)] == ["b"]
    assert ledger.choose_victims(400, None, free_bytes=2000) is None
    assert "leased: ['a']" in ledger.busy_reason(400, 1.0, 2000, None)


def test_reserve_counts_free_memory_and_promised_rooms():
    ledger = make_ledger(budget=2000, reserve=500)
    add(ledger, "a", mc.Tier.DEVICE, 300, tick=0)
    add(ledger, "b", mc.Tier.DEVICE, 300, tick=1)
    # budget has room, but only 700 B are free: 400 more would leave 300 < reserve of 500
    assert [v.name for v in ledger.choose_victims(400, None, free_bytes=700)] == ["a"]
    room = ledger.reserve_room(ledger.entries["b"], 200, [])
    assert ledger.accounted_bytes() == 800      # 600 resident + the room promised
    # the promised room counts against free memory too: 700 - 200 pending - 100 < 500
    assert [v.name for v in ledger.choose_victims(100, ledger.entries["b"], free_bytes=700)] == ["a"]
    ledger.release_room(room)
    assert ledger.accounted_bytes() == 600


def test_victim_bytes_count_towards_the_room_until_they_leave():
    ledger = make_ledger(budget=500)
    a = add(ledger, "a", mc.Tier.DEVICE, 400, tick=0)
    b = add(ledger, "b", mc.Tier.HOST, 300, tick=1)
    room = ledger.reserve_room(b, 300, [a])
    assert ledger.accounted_bytes() == 400     # max(need 300, a's 400 still on the device)
    a.tier, a.handle.tier, a.handle.device_bytes = mc.Tier.HOST, mc.Tier.HOST, 0
    assert ledger.accounted_bytes() == 300     # a has left: the room is what b needs
    ledger.release_room(room)


def test_parked_bytes_are_unparked_after_evictions():
    ledger = make_ledger(budget=600)
    add(ledger, "parked", mc.Tier.HOST, 100, tick=0, kept=200)
    add(ledger, "resident", mc.Tier.DEVICE, 300, tick=1)
    assert ledger.accounted_bytes() == 500
    assert [c.name for c in ledger.evictable()] == ["resident"]
    assert [(nbytes, [m.name for m in members]) for nbytes, members in ledger.droppable_shared()] == \
        [(200, ["parked"])]
    victims = ledger.choose_victims(500, None, free_bytes=2000)
    assert {v.name for v in victims} == {"resident", "parked"}


def test_costly_shared_memory_is_kept_while_waiting_for_leases_would_make_room():
    """A parked model's session (200 B, 1 s to create again) is not dropped for a request that
    waiting for a leased model could serve: unless the request has waited as long as the session
    would take to make again, or waiting could not make the room."""
    ledger = make_ledger(budget=600)
    parked = add(ledger, "parked", mc.Tier.HOST, 100, tick=0, kept=200)
    parked.handle.seconds = 1.0
    add(ledger, "leased", mc.Tier.DEVICE, 300, tick=1, leases=1)
    assert ledger.choose_victims(200, None, free_bytes=2000, waited_s=0.0) is None     # wait for "leased"
    assert ledger.choose_victims(200, None, free_bytes=2000, waited_s=0.5) is None
    assert [v.name for v in ledger.choose_victims(200, None, free_bytes=2000, waited_s=1.0)] == ["parked"]
    assert [v.name for v in ledger.choose_victims(200, None, free_bytes=2000)] == ["parked"]   # pressure relief
    parked.handle.seconds = 0.0                  # cheap to make again: dropped at once
    assert [v.name for v in ledger.choose_victims(200, None, free_bytes=2000, waited_s=0.0)] == ["parked"]
    parked.handle.seconds = 1.0
    ledger.entries["leased"].handle.device_bytes = 100     # waiting could free 100 B only: drop it now
    ledger.entries["leased"].handle.nbytes = 100
    assert [v.name for v in ledger.choose_victims(450, None, free_bytes=2000, waited_s=0.0)] == ["parked"]


def test_too_large_and_host_victims():
    ledger = make_ledger(budget=800, reserve=300, total=1000, host_budget=500)
    with pytest.raises(mc.ModelTooLargeError, match="700 B"):
        ledger.check_fits("big", 701)
    ledger.check_fits("fits", 700)
    add(ledger, "old", mc.Tier.HOST, 300, tick=0)
    add(ledger, "new", mc.Tier.HOST, 300, tick=1)
    assert [v.name for v in ledger.host_victims(keep=None)] == ["old"]
    assert [v.name for v in ledger.host_victims(keep=ledger.entries["old"])] == ["new"]
    assert ledger.below_host(ledger.entries["old"]) is mc.Tier.UNLOADED


def test_a_reservation_answers_for_what_its_victims_keep_after_their_move():
    """An evicted model keeps its session on the device: while the eviction runs, the reservation
    answers for the swap-in's need plus that session, so a planner in between does not promise it
    away (found on the simulated zoo stress: the books went 10 % over the budget)."""
    ledger = make_ledger(budget=1000)
    a = add(ledger, "a", mc.Tier.DEVICE, 600, tick=0, kept=200)    # 400 of weights, a 200-byte session
    add(ledger, "b", mc.Tier.DEVICE, 100, tick=1)
    new = add(ledger, "new", mc.Tier.HOST, 0, tick=2)
    victims = ledger.choose_victims(500, exclude=new, free_bytes=2000)
    assert victims == [a]
    reservation = ledger.reserve_room(new, 500, victims)
    a.moving = object()                                          # its eviction runs
    assert ledger.accounted_bytes() == 100 + 500 + 200 == 800    # not 600: a's session stays
    assert ledger.choose_victims(350, exclude=None, free_bytes=2000) is None     # 200 left, b frees only 100
    a.tier, a.handle.tier, a.handle.device_bytes, a.evicting_for, a.moving = mc.Tier.HOST, mc.Tier.HOST, 0, None, None   # moved: parked
    assert reservation.claim() == 500 and ledger.accounted_bytes() == 800


def test_a_swap_in_whose_session_is_being_dropped_for_another_waits():
    """A parked model chosen to give up its session for another swap-in: a swap-in of its
    architecture waits until the session has gone, instead of counting on it staying."""
    ledger = make_ledger(budget=1000)
    parked = add(ledger, "parked", mc.Tier.HOST, 300, tick=0, kept=200)
    sibling = add(ledger, "sibling", mc.Tier.HOST, 300, tick=1)
    other = add(ledger, "other", mc.Tier.HOST, 0, tick=2)
    for e in (parked, sibling):
        e.handle.shared_key = lambda: "arch"
    assert not ledger.shared_leaving(sibling)
    ledger.reserve_room(other, 900, [parked])
    parked.moving, parked.moving_to = object(), mc.Tier.HOST     # unparked for the other swap-in
    assert ledger.shared_leaving(sibling) and not ledger.shared_leaving(other)
    parked.moving = parked.moving_to = parked.evicting_for = None     # its move ended
    assert not ledger.shared_leaving(sibling)
    sibling.tier = mc.Tier.DEVICE                    # a resident model going to disk drops it too
    parked.moving, parked.moving_to = object(), mc.Tier.DISK
    other.handle.shared_key = lambda: "arch"
    assert ledger.shared_leaving(other)
    parked.moving_to = mc.Tier.HOST                  # evicted, not unparked: the session stays
    parked.tier = mc.Tier.DEVICE
    assert not ledger.shared_leaving(other)


def test_a_swap_in_in_flight_is_counted_once_whatever_its_handle_holds_meanwhile():
    """The backend's move changes the handle under the books (a session made, or carried, and the
    handle's tier set) before the cache commits: the entry and its reservation together count
    what it held when planned plus its need, or what it holds now if that is more, never both."""
    ledger = make_ledger(budget=1000)
    new = add(ledger, "new", mc.Tier.HOST, 300, tick=0)
    ledger.reserve_room(new, 500, [])            # weights 300 and a session estimated at 200
    assert ledger.accounted_bytes() == 500
    new.handle.kept = 180                        # its session made (180 B), the handle still on the host
    assert ledger.accounted_bytes() == 500       # not 680: the reservation answers for it
    new.handle.kept = 220                        # more than the estimate: the excess counts too
    assert ledger.accounted_bytes() == 520
    new.handle.tier, new.handle.device_bytes = mc.Tier.DEVICE, 520     # past the backend's move
    assert ledger.accounted_bytes() == 520       # what it holds, not less
    parked = add(ledger, "parked", mc.Tier.HOST, 300, tick=1, kept=200)   # carries its session parked
    ledger.reserve_room(parked, 300, [])         # the weights: the session is counted already
    assert ledger.accounted_bytes() == 520 + 200 + 300
    parked.handle.tier, parked.handle.device_bytes = mc.Tier.DEVICE, 500
    assert ledger.accounted_bytes() == 520 + 500    # not 520 + 300: the session stays counted
