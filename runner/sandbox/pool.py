"""``WarmPool``: task containers started ahead of time, each used exactly once.

Owns: the set of idle *slots* (a started container whose agent is blocked on its
stdin, waiting for one task), the background refill that keeps ``size`` of them
ready, their ageing (a slot older than ``max_idle_s`` is destroyed and replaced),
their key (a slot is only handed to a task whose container would have been
created exactly like it), and the hand-over itself: a slot leaves the pool once
and is never put back.

What a slot *is* belongs to the caller: the pool receives blocking ``create`` and
``destroy`` functions and runs them in its own small thread pool (so a refill
never waits behind long-running tasks in the default executor). It must not
import docker; :class:`~runner.sandbox.docker.DockerSandbox` plugs Docker in, and
the unit tests plug in fakes.

Nothing here polls: the maintainer sleeps on an event until something changes (a
slot taken, created, or discarded; the key or size changed; the pool closing) or
until the oldest idle slot reaches its maximum age, which is a timer, not a poll.
A failed creation backs off exponentially (capped), so a dead daemon costs a
retry every few seconds, not a busy loop; tasks meanwhile start cold with their
own set-up retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How many slots to keep, how many to create at once, how long one may idle, and
    the modules a slot's agent imports before it waits (``[image] preload``)."""

    size: int = 2
    refill_concurrency: int = 2
    max_idle_s: float = 300.0
    preload: tuple[str, ...] = ()

    @property
    def is_enabled(self) -> bool:
        return self.size > 0


class Miss(enum.StrEnum):
    """Why a task did not get a warm slot (it then starts a cold container)."""

    DISABLED = "pool_disabled"
    KEY_DIFFERS = "limits_or_policy_differ"
    # The slots preload a module this task's allowlist refuses (its tenant's profile):
    # such a slot is never handed to it (runner.sandbox.container).
    PRELOAD_NOT_ALLOWED = "preload_not_allowed"
    EMPTY = "pool_empty"
    DOES_NOT_FIT = "slot_deadline_too_short"
    CLOSED = "pool_closed"


@dataclass(slots=True)
class Slot(Generic[T]):
    """One started container waiting for its task. ``resource`` is the caller's handle."""

    key: str
    resource: T
    ready_at: float  # monotonic
    expires_at: float  # monotonic: ready_at + max_idle_s

    def age_s(self, now: float) -> float:
        return now - self.ready_at

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


@dataclass(slots=True)
class _Creation(Generic[T]):
    """A slot being created in a worker thread. A waiting task may claim it."""

    generation: int
    done: asyncio.Future[Slot[T] | None]
    claimed: bool = False


@dataclass(slots=True)
class PoolStats:
    """Counters for health and metrics (all since the pool was built)."""

    size: int
    idle: int
    creating: int
    created: int = 0
    taken: int = 0
    expired: int = 0
    discarded: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Counters:
    created: int = 0
    taken: int = 0
    expired: int = 0
    discarded: int = 0
    failures: int = 0


@dataclass(slots=True)
class Taken(Generic[T]):
    """What :meth:`WarmPool.take` returns: a slot, or why there is none."""

    slot: Slot[T] | None
    miss: Miss | None = None
    waited_s: float = 0.0


@dataclass(slots=True)
class _State(Generic[T]):
    idle: list[Slot[T]] = field(default_factory=list)  # oldest first
    creating: list[_Creation[T]] = field(default_factory=list)


class WarmPool(Generic[T]):
    """Keeps ``config.size`` started slots ready; hands each one out at most once.

    ``create()`` runs in a worker thread, builds one slot's resource under the
    *current* container configuration and returns ``(key, resource)``; the key is
    a digest of everything that shapes the container (image, isolation, limits).
    ``destroy(resource)`` removes it. ``is_alive(resource)`` must be cheap and
    non-blocking: it is asked on the event loop at hand-over.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        create: Callable[[], tuple[str, T]],
        destroy: Callable[[T], None],
        is_alive: Callable[[T], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._create = create
        self._destroy = destroy
        self._is_alive = is_alive
        self._clock = clock
        self._state: _State[T] = _State()
        self._generation = 0
        # The key the last creation of this generation produced: slots in flight will
        # have it too, so a task with another key need not wait for one.
        self._creation_key: str | None = None
        self._counters = _Counters()
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._maintainer: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # -- public API -----------------------------------------------------------------

    @property
    def config(self) -> PoolConfig:
        return self._config

    @property
    def is_started(self) -> bool:
        return self._maintainer is not None

    def stats(self) -> PoolStats:
        counters = self._counters
        return PoolStats(
            size=self._config.size,
            idle=len(self._state.idle),
            creating=len(self._state.creating),
            created=counters.created,
            taken=counters.taken,
            expired=counters.expired,
            discarded=counters.discarded,
            failures=counters.failures,
        )

    def idle_resources(self) -> list[T]:
        """The resources of the idle slots, oldest first (for tests and diagnostics)."""
        return [slot.resource for slot in self._state.idle]

    def start(self) -> None:
        """Begin filling the pool in the background (idempotent; needs a running loop)."""
        if self._maintainer is not None or self._closed or not self._config.is_enabled:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=self._config.refill_concurrency, thread_name_prefix="warm-pool"
        )
        self._maintainer = asyncio.get_running_loop().create_task(
            self._maintain(), name="warm-pool-maintainer"
        )

    async def take(self, key: str, fits: Callable[[Slot[T]], bool] | None = None) -> Taken[T]:
        """The oldest usable idle slot with ``key``; else a creation in flight; else a miss.

        A slot that is dead (its agent went away while idle) or expired is destroyed
        here and never handed out. ``fits`` tells whether a slot can serve this task
        (e.g. its deadline label covers the task's timeout); a slot that does not fit
        stays in the pool for another task.
        """
        if not self._config.is_enabled:
            return Taken(None, Miss.DISABLED)
        if self._closed:
            return Taken(None, Miss.CLOSED)
        self.start()
        now = self._clock()
        miss = Miss.EMPTY
        for slot in list(self._state.idle):
            if slot.key != key:
                miss = Miss.KEY_DIFFERS
                continue
            if slot.is_expired(now) or not self._is_alive(slot.resource):
                self._discard(slot, expired=slot.is_expired(now))
                continue
            if fits is not None and not fits(slot):
                miss = Miss.DOES_NOT_FIT
                continue
            self._state.idle.remove(slot)
            self._counters.taken += 1
            self._wakeup.set()  # refill behind it
            await self._notify()
            return Taken(slot)
        if miss is not Miss.EMPTY:
            return Taken(None, miss)
        return await self._claim_creation(key, fits)

    async def wait_filled(self) -> None:
        """Until ``size`` slots are idle (tests and benchmarks; a task never waits for this)."""
        self.start()
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._closed or len(self._state.idle) >= self._config.size
            )

    def invalidate(self) -> None:
        """The container configuration changed: drop every idle slot and refill.

        Creations in flight finish and are destroyed (their generation is old).
        """
        self._generation += 1
        self._creation_key = None  # a new image or policy: keys of the past say nothing
        for slot in list(self._state.idle):
            self._discard(slot)
        self._wakeup.set()

    async def aclose(self) -> None:
        """Stop refilling, wait for creations in flight, destroy every idle slot."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._maintainer is not None:
            await self._maintainer
        while self._state.creating:
            creations = [creation.done for creation in self._state.creating]
            await asyncio.gather(*creations, return_exceptions=True)
        for slot in list(self._state.idle):
            self._discard(slot)
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        await self._notify()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- hand-over of a creation in flight ------------------------------------------

    async def _claim_creation(self, key: str, fits: Callable[[Slot[T]], bool] | None) -> Taken[T]:
        """Wait for an unclaimed creation of the current generation, if there is one.

        It is never slower than a cold start (the creation is already under way) and
        adds no container to the daemon's work. Each creation serves one waiter; if
        none is free, the caller starts cold at once instead of queueing.
        """
        creation = next(
            (c for c in self._state.creating if not c.claimed and c.generation == self._generation),
            None,
        )
        if creation is None:
            return Taken(None, Miss.EMPTY)
        if self._creation_key is not None and self._creation_key != key:
            return Taken(None, Miss.KEY_DIFFERS)  # it could not serve this task: start cold
        creation.claimed = True
        self._wakeup.set()  # the claimed creation no longer counts toward the target
        began = self._clock()
        try:
            slot = await asyncio.shield(creation.done)
        except asyncio.CancelledError:
            # The task was cancelled while waiting: the slot goes to the pool after all.
            if not creation.done.done():
                creation.claimed = False
            elif (orphan := creation.done.result()) is not None:
                self._add_idle(orphan)
            raise
        waited = self._clock() - began
        if slot is None:
            return Taken(None, Miss.EMPTY, waited)
        if slot.key != key or (fits is not None and not fits(slot)):
            self._add_idle(slot)  # another task can use it
            return Taken(None, Miss.KEY_DIFFERS if slot.key != key else Miss.DOES_NOT_FIT, waited)
        self._counters.taken += 1
        return Taken(slot, None, waited)

    # -- maintenance ----------------------------------------------------------------

    async def _maintain(self) -> None:
        try:
            while not self._closed:
                now = self._clock()
                for slot in [s for s in self._state.idle if s.is_expired(now)]:
                    self._discard(slot, expired=True)
                self._refill(now)
                self._wakeup.clear()
                timeout = self._next_timer(now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
        except Exception:
            # A bug here must not take tasks down with it: they start cold from now on,
            # and aclose still removes whatever the pool holds.
            log.exception("warm pool: maintenance stopped; tasks start cold")

    def _next_timer(self, now: float) -> float | None:
        """Seconds until the next thing that is due without an event: an expiry or a retry."""
        due = [slot.expires_at for slot in self._state.idle]
        if self._retry_at > now:
            due.append(self._retry_at)
        return max(0.0, min(due) - now) if due else None

    def _refill(self, now: float) -> None:
        if self._closed or now < self._retry_at:
            return
        state = self._state
        unclaimed = sum(1 for c in state.creating if not c.claimed)
        missing = self._config.size - len(state.idle) - unclaimed
        free = self._config.refill_concurrency - len(state.creating)
        for _ in range(max(0, min(missing, free))):
            creation: _Creation[T] = _Creation(
                self._generation, asyncio.get_running_loop().create_future()
            )
            state.creating.append(creation)
            self._spawn(self._run_creation(creation), "warm-pool-create")

    async def _run_creation(self, creation: _Creation[T]) -> None:
        loop = asyncio.get_running_loop()
        slot: Slot[T] | None = None
        try:
            key, resource = await loop.run_in_executor(self._executor, self._create)
        except Exception as exc:  # any failure: back off, tasks start cold meanwhile
            self._counters.failures += 1
            self._backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self._backoff_s * 2))
            self._retry_at = self._clock() + self._backoff_s
            log.warning(
                "warm pool: could not start a container (retry in %.1fs): %s: %s",
                self._backoff_s,
                type(exc).__name__,
                exc,
            )
        else:
            self._counters.created += 1
            self._backoff_s, self._retry_at = 0.0, 0.0
            now = self._clock()
            slot = Slot(key, resource, now, now + self._config.max_idle_s)
            if creation.generation == self._generation:
                self._creation_key = key
            if self._closed or creation.generation != self._generation:
                self._destroy_later(resource)
                slot = None
            elif not creation.claimed:
                self._add_idle(slot)
        finally:
            self._state.creating.remove(creation)
            if not creation.done.done():
                creation.done.set_result(slot)
            self._wakeup.set()
        await self._notify()

    def _add_idle(self, slot: Slot[T]) -> None:
        # A newer key means the container configuration moved on (e.g. the image tag
        # points elsewhere now): slots of other keys can no longer be handed out.
        for stale in [s for s in self._state.idle if s.key != slot.key]:
            self._discard(stale)
        self._state.idle.append(slot)
        self._state.idle.sort(key=lambda s: s.ready_at)
        self._wakeup.set()
        self._spawn(self._notify(), "warm-pool-notify")

    def _discard(self, slot: Slot[T], *, expired: bool = False) -> None:
        if slot in self._state.idle:
            self._state.idle.remove(slot)
        if expired:
            self._counters.expired += 1
        else:
            self._counters.discarded += 1
        self._destroy_later(slot.resource)
        self._wakeup.set()

    def _destroy_later(self, resource: T) -> None:
        self._spawn(self._destroy_async(resource), "warm-pool-destroy")

    async def _destroy_async(self, resource: T) -> None:
        try:
            await asyncio.to_thread(self._destroy, resource)
        except Exception:  # destroy is best-effort; the sweep is the backstop
            log.warning("warm pool: could not destroy a slot", exc_info=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Every background job is kept until it ends (``aclose`` waits for them)."""
        job = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


__all__ = ["Miss", "PoolConfig", "PoolStats", "Slot", "Taken", "WarmPool"]
