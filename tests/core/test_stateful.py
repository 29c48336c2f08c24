"""Hypothesis explores sequences of operations; after each one the invariants must hold."""
import time

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import modelcache as mc

NAMES = [f"m{i}" for i in range(6)]
SIZES = {name: 60 + 40 * i for i, name in enumerate(NAMES)}   # 60..260 bytes
BUDGET = 500


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.device = mc.SimulatedDevice(1000)
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.cache = mc.ModelCache(monitor=self.device, device_budget=BUDGET, reserve=100, host_budget=400,
                                   disk_dir=self.tmp.name, watch_interval=None, policy="lru")
        self.leases = []
        self.other = []
        for name in NAMES:
            self.cache.register(name, self._loader(name))

    @staticmethod
    def _loader(name):
        return lambda: np.full(SIZES[name], int(name[1:]), np.uint8)

    def _settle(self):
        """timeout=0 is a promise: a miss returns at once while its move goes on; wait for the moves
        in flight, so that every rule ends in a settled state."""
        for _ in range(5000):      # (a move's thread may go on to settle the host tier: wait for it too)
            busy = self.cache._moves.workers.busy()
            if not busy and all(e.moving is None for e in self.cache._entries.values()):
                return
            time.sleep(0.001)
        raise AssertionError("a move did not finish")

    @rule(name=st.sampled_from(NAMES))
    def lease(self, name):
        lease = self.cache.use(name, timeout=0)
        try:
            model = lease.acquire()
        except mc.LeaseTimeoutError:      # no room now (DeviceBusyError), or its move goes on: settle
            self._settle()
            return
        assert model.nbytes == SIZES[name] and model[0] == int(name[1:])
        self.leases.append(lease)
        self._settle()

    # No preconditions on, and no draws sized by, what earlier rules got. Whether a lease with
    # timeout=0 found its model moved in yet, or another process's take found room, depends on
    # timing, and Hypothesis requires the same choices to draw the same way (under CPU load it
    # stopped with FlakyStrategyDefinition)
    @rule(k=st.integers(0, 1000))
    def release(self, k):
        if not self.leases:
            return
        lease = self.leases.pop(k % len(self.leases))
        lease.release()

    @rule(name=st.sampled_from(NAMES), tier=st.sampled_from([mc.Tier.HOST, mc.Tier.DISK, mc.Tier.UNLOADED]))
    def evict(self, name, tier):
        leased = any(l.name == name for l in self.leases)
        try:
            self.cache.evict(name, tier=tier, timeout=0)
            assert not leased or self.cache.info(name).tier is mc.Tier.DEVICE
        except mc.ModelInUseError:
            assert leased
        except mc.LeaseTimeoutError:
            pass
        self._settle()

    @rule(name=st.sampled_from(NAMES))
    def prefetch_host(self, name):
        try:
            self.cache.prefetch(name, tier=mc.Tier.HOST, timeout=0).result(5)
        except mc.LeaseTimeoutError:
            pass
        self._settle()

    @rule(nbytes=st.integers(50, 400))
    def other_process_takes(self, nbytes):
        try:
            self.other.append(self.device.take(nbytes))
        except mc.DeviceOutOfMemoryError:
            pass
        self.cache.check_pressure()

    @rule()
    def other_process_frees(self):
        if self.other:
            self.other.pop().free()

    @rule(name=st.sampled_from(NAMES))
    def unregister_and_register(self, name):
        if any(l.name == name for l in self.leases):
            return
        self.cache.unregister(name)
        self.cache.register(name, self._loader(name))

    @invariant()
    def budget_respected(self):
        stats = self.cache.stats()
        assert stats["device.accounted_bytes"] <= BUDGET
        assert self.device.process_bytes() == stats["device.bytes"] <= BUDGET

    @invariant()
    def one_tier_per_model(self):
        for info in self.cache.entries():
            on_device = info.device_bytes > 0
            assert on_device == (info.tier is mc.Tier.DEVICE), info
            assert (info.disk_path is not None) == (info.tier is mc.Tier.DISK), info
            if info.tier is mc.Tier.HOST:
                assert info.host_bytes == SIZES[info.name]
            if info.tier in (mc.Tier.DISK, mc.Tier.UNLOADED):
                assert info.host_bytes == 0
            assert info.moving_to is None

    @invariant()
    def leased_models_stay_on_device(self):
        for lease in self.leases:
            assert self.cache.info(lease.name).tier is mc.Tier.DEVICE
        counts = {}
        for lease in self.leases:
            counts[lease.name] = counts.get(lease.name, 0) + 1
        for info in self.cache.entries():
            assert info.leases == counts.get(info.name, 0)

    def teardown(self):
        for lease in self.leases:
            lease.release()
        self.cache.close()
        assert self.device.process_bytes() == 0
        self.tmp.cleanup()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
