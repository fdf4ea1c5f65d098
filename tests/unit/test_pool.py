"""The warm pool without Docker: slots are plain objects made by a fake factory."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

import pytest

from runner.sandbox.pool import Miss, PoolConfig, WarmPool


@dataclass(eq=False)
class FakeSlot:
    number: int
    key: str
    alive: bool = True


@dataclass
class Factory:
    """Creates numbered slots under the current key; records what it destroyed."""

    key: str = "k1"
    fail: bool = False
    gate: threading.Event | None = None
    created: list[FakeSlot] = field(default_factory=list)
    destroyed: list[FakeSlot] = field(default_factory=list)
    running: int = 0
    peak: int = 0
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _entered: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    _loop: asyncio.AbstractEventLoop | None = None

    async def entered(self, count: int = 1) -> None:
        """Until ``count`` more creations have begun (signalled from their threads)."""
        async with asyncio.timeout(10):
            for _ in range(count):
                await self._entered.acquire()

    def create(self) -> tuple[str, FakeSlot]:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._entered.release)
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "gate never opened"
            if self.fail:
                raise ConnectionError("daemon down")
            slot = FakeSlot(next(self._numbers), self.key)
            with self._lock:
                self.created.append(slot)
            return self.key, slot
        finally:
            with self._lock:
                self.running -= 1

    def destroy(self, slot: FakeSlot) -> None:
        with self._lock:
            self.destroyed.append(slot)

    def pool(
        self, size: int = 2, concurrency: int = 2, max_idle_s: float = 60
    ) -> WarmPool[FakeSlot]:
        self._loop = asyncio.get_running_loop()
        return WarmPool(
            PoolConfig(size=size, refill_concurrency=concurrency, max_idle_s=max_idle_s),
            create=self.create,
            destroy=self.destroy,
            is_alive=lambda slot: slot.alive,
        )


async def wait_for(pool: WarmPool[FakeSlot], predicate: object) -> None:
    """Wait on the pool's own change notifications (no sleeps), bounded by a timeout."""
    assert callable(predicate)
    async with asyncio.timeout(10):
        async with pool._changed:
            await pool._changed.wait_for(predicate)


async def test_fills_to_its_size_and_hands_each_slot_out_once() -> None:
    factory = Factory()
    pool = factory.pool(size=2)
    try:
        await pool.wait_filled()
        seen = set()
        for _ in range(6):
            taken = await pool.take("k1")
            assert taken.slot is not None
            assert taken.miss is None
            assert id(taken.slot.resource) not in seen, "a slot was handed out twice"
            seen.add(id(taken.slot.resource))
            await pool.wait_filled()
        assert pool.stats().taken == 6
        assert pool.stats().idle == 2
    finally:
        await pool.aclose()


async def test_refill_runs_at_most_refill_concurrency_creations_at_once() -> None:
    factory = Factory(gate=threading.Event())
    pool = factory.pool(size=4, concurrency=2)
    pool.start()
    try:
        await factory.entered(2)
        assert pool.stats().creating == 2
        factory.gate.set()  # type: ignore[union-attr]
        await pool.wait_filled()
        assert factory.peak == 2
        assert len(factory.created) == 4
    finally:
        factory.gate.set()  # type: ignore[union-attr]
        await pool.aclose()


async def test_a_different_key_is_a_miss_and_invalidate_replaces_every_slot() -> None:
    factory = Factory()
    pool = factory.pool(size=2)
    try:
        await pool.wait_filled()
        old = pool.idle_resources()
        taken = await pool.take("other-limits")
        assert taken.slot is None
        assert taken.miss is Miss.KEY_DIFFERS
        assert pool.stats().idle == 2, "a miss must not cost the pool its slots"

        factory.key = "k2"
        pool.invalidate()
        await pool.wait_filled()
        assert all(slot.key == "k2" for slot in pool.idle_resources())
        assert (await pool.take("k2")).slot is not None
        await wait_for(pool, lambda: set(map(id, old)) <= set(map(id, factory.destroyed)))
    finally:
        await pool.aclose()


async def test_idle_slots_past_their_maximum_age_are_recycled() -> None:
    factory = Factory()
    pool = factory.pool(size=1, max_idle_s=0.2)
    try:
        await pool.wait_filled()
        first = pool.idle_resources()[0]
        await wait_for(pool, lambda: pool.stats().expired >= 1 and pool.stats().idle == 1)
        assert pool.idle_resources()[0] is not first
        await wait_for(pool, lambda: first in factory.destroyed)
    finally:
        await pool.aclose()


async def test_a_dead_slot_is_destroyed_not_handed_out() -> None:
    factory = Factory()
    pool = factory.pool(size=2)
    try:
        await pool.wait_filled()
        dead, alive = pool.idle_resources()
        dead.alive = False
        taken = await pool.take("k1")
        assert taken.slot is not None
        assert taken.slot.resource is alive
        await wait_for(pool, lambda: dead in factory.destroyed)
        assert pool.stats().discarded == 1
    finally:
        await pool.aclose()


async def test_a_slot_that_does_not_fit_stays_for_another_task() -> None:
    factory = Factory()
    pool = factory.pool(size=1)
    try:
        await pool.wait_filled()
        taken = await pool.take("k1", fits=lambda slot: False)
        assert taken.miss is Miss.DOES_NOT_FIT
        assert pool.stats().idle == 1
        assert (await pool.take("k1", fits=lambda slot: True)).slot is not None
    finally:
        await pool.aclose()


async def test_a_task_finding_the_pool_empty_claims_a_creation_in_flight() -> None:
    factory = Factory(gate=threading.Event())
    pool = factory.pool(size=1, concurrency=1)
    pool.start()
    try:
        await factory.entered()
        waiter = asyncio.create_task(pool.take("k1"))
        await asyncio.sleep(0)
        # A second task finds nothing to claim: it starts cold at once, it does not queue.
        second = await pool.take("k1")
        assert second.slot is None
        assert second.miss is Miss.EMPTY
        factory.gate.set()  # type: ignore[union-attr]
        taken = await waiter
        assert taken.slot is not None
        assert taken.slot.resource is factory.created[0]
        # The claimed creation did not count toward the target: the pool refills.
        await pool.wait_filled()
        assert pool.idle_resources()[0] is not taken.slot.resource
    finally:
        factory.gate.set()  # type: ignore[union-attr]
        await pool.aclose()


async def test_a_task_with_another_key_does_not_wait_for_a_creation_in_flight() -> None:
    factory = Factory(gate=threading.Event())
    pool = factory.pool(size=1, concurrency=1)
    try:
        factory.gate.set()  # type: ignore[union-attr]
        await pool.wait_filled()  # the pool has seen what its creations make: key k1
        factory.gate.clear()  # type: ignore[union-attr]
        assert (await pool.take("k1")).slot is not None
        await factory.entered(2)  # the first creation, then the refill (held at the gate)
        # Other limits, another key: starting cold at once beats waiting for a slot
        # that could not serve it; the creation stays for a task that can use it.
        other = await pool.take("k2")
        assert other.slot is None
        assert other.miss is Miss.KEY_DIFFERS
        assert other.waited_s == 0
        waiter = asyncio.create_task(pool.take("k1"))
        factory.gate.set()  # type: ignore[union-attr]
        assert (await waiter).slot is not None
    finally:
        factory.gate.set()  # type: ignore[union-attr]
        await pool.aclose()


async def test_a_cancelled_waiter_leaves_its_slot_to_the_pool() -> None:
    factory = Factory(gate=threading.Event())
    pool = factory.pool(size=1, concurrency=1)
    pool.start()
    try:
        await factory.entered()
        waiter = asyncio.create_task(pool.take("k1"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        factory.gate.set()  # type: ignore[union-attr]
        await pool.wait_filled()
        assert pool.idle_resources() == [factory.created[0]]
    finally:
        factory.gate.set()  # type: ignore[union-attr]
        await pool.aclose()


async def test_failed_creations_back_off_and_tasks_start_cold_meanwhile() -> None:
    factory = Factory(fail=True)
    pool = factory.pool(size=1)
    try:
        pool.start()
        await wait_for(pool, lambda: pool.stats().failures >= 1)
        taken = await pool.take("k1")
        assert taken.slot is None
        assert taken.miss is Miss.EMPTY
        assert pool.stats().failures == 1, "no retry before the back-off elapsed"
        factory.fail = False
        await pool.wait_filled()  # the retry after the back-off succeeds
    finally:
        await pool.aclose()


async def test_aclose_destroys_idle_slots_and_creations_in_flight() -> None:
    factory = Factory(gate=threading.Event())
    pool = factory.pool(size=3, concurrency=3)
    factory.gate.set()
    await pool.wait_filled()
    factory.gate.clear()
    taken = await pool.take("k1")
    assert taken.slot is not None
    await factory.entered(4)  # three to fill, one to refill behind the take
    closing = asyncio.create_task(pool.aclose())
    await asyncio.sleep(0)
    factory.gate.set()
    await closing
    assert len(factory.created) == 4
    left = [slot for slot in factory.created if slot is not taken.slot.resource]
    assert sorted(s.number for s in factory.destroyed) == sorted(s.number for s in left)
    assert (await pool.take("k1")).miss is Miss.CLOSED


async def test_size_zero_means_cold_only() -> None:
    factory = Factory()
    pool = factory.pool(size=0)
    taken = await pool.take("k1")
    assert taken.miss is Miss.DISABLED
    await pool.aclose()
    assert factory.created == []


def test_pool_settings_default_to_two_slots_and_zero_means_cold_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from runner.cli.wiring import pool_config
    from runner.settings import Settings

    for name in ("SANDBOX_POOL_SIZE", "SANDBOX_POOL_REFILL_CONCURRENCY", "SANDBOX_POOL_MAX_IDLE_S"):
        monkeypatch.delenv(name, raising=False)
    assert pool_config(Settings()) == PoolConfig(size=2, refill_concurrency=2, max_idle_s=300)
    monkeypatch.setenv("SANDBOX_POOL_SIZE", "0")
    monkeypatch.setenv("SANDBOX_POOL_MAX_IDLE_S", "30")
    config = pool_config(Settings())
    assert not config.is_enabled
    assert config.max_idle_s == 30
    monkeypatch.setenv("SANDBOX_POOL_REFILL_CONCURRENCY", "0")
    with pytest.raises(ValidationError):
        Settings()
