"""Tenants: their queues, quotas and budgets, and fair turns between them.

Owns: one queue of task ids per tenant and the round-robin over tenants that picks
whose task goes to the next offer (one busy tenant cannot starve the others), each
tenant's count of tasks on runners (held against its quota), of unfinished tasks
(``max_unfinished_per_tenant``) and of bytes its unfinished tasks hold (the
queued-bytes budget), and admission against those two (:class:`TenantBacklogFull`,
a 429; :class:`TaskTooLarge`, a 413).

Counts and ids only: the tasks themselves are in :mod:`runner.broker_server.tasks`.
No I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from runner.errors import TaskTooLarge, TenantBacklogFull


class Tenants:
    def __init__(self) -> None:
        self._queues: dict[str, deque[str]] = {}
        self._round_robin: deque[str] = deque()
        self._active: dict[str, int] = {}  # tenant -> offered + running
        self._unfinished: dict[str, int] = {}  # tenant -> queued + offered + running
        self._queued_bytes: dict[str, int] = {}  # tenant -> bytes its unfinished tasks hold

    def admit(self, tenant: str, size: int, *, max_unfinished: int, max_bytes: int) -> None:
        """Count one more unfinished task of ``size`` bytes, or refuse it
        (:func:`check_admission`)."""
        queued = self._queued_bytes.get(tenant, 0)
        check_admission(
            tenant,
            size,
            unfinished=self._unfinished.get(tenant, 0),
            queued_bytes=queued,
            max_unfinished=max_unfinished,
            max_bytes=max_bytes,
        )
        self._unfinished[tenant] = self._unfinished.get(tenant, 0) + 1
        self._queued_bytes[tenant] = queued + size

    def recount(self, tenant: str, size: int) -> None:
        """Count a recovered unfinished task of ``size`` bytes, without admission: it was
        admitted by the broker before (a budget lowered since must not lose it)."""
        self._unfinished[tenant] = self._unfinished.get(tenant, 0) + 1
        self._queued_bytes[tenant] = self._queued_bytes.get(tenant, 0) + size

    def sent(self, tenant: str, size: int) -> None:
        """``size`` bytes of a task went to its runner: the tenant no longer holds them."""
        self._queued_bytes[tenant] -= size

    def finished(self, tenant: str, held_bytes: int) -> None:
        """One of the tenant's tasks ended, holding ``held_bytes`` until then."""
        self._unfinished[tenant] = max(0, self._unfinished.get(tenant, 0) - 1)
        self._queued_bytes[tenant] = max(0, self._queued_bytes.get(tenant, 0) - held_bytes)

    # -- queues and turns ----------------------------------------------------------------

    def queue(self, tenant: str, task_id: str, *, front: bool) -> None:
        queue = self._queues.setdefault(tenant, deque())
        if tenant not in self._round_robin:
            self._round_robin.append(tenant)
        if front:
            queue.appendleft(task_id)
        else:
            queue.append(task_id)

    def unqueue(self, tenant: str, task_id: str) -> None:
        queue = self._queues.get(tenant)
        if queue and task_id in queue:
            queue.remove(task_id)

    def next_tenant(self, quota: Callable[[str], int]) -> str | None:
        """The next tenant in turn with a queued task and room in its ``quota``."""
        for _ in range(len(self._round_robin)):
            tenant = self._round_robin[0]
            self._round_robin.rotate(-1)
            if self._queues.get(tenant) and self.active(tenant) < quota(tenant):
                return tenant
        return None

    def pop(self, tenant: str) -> str:
        """The id of the tenant's first queued task, taken from its queue."""
        return self._queues[tenant].popleft()

    def queued_count(self, quota: Callable[[str], int] | None = None) -> int:
        """Queued task ids (with ``quota``: of tenants with room in it only)."""
        return sum(
            len(queue)
            for tenant, queue in self._queues.items()
            if quota is None or self.active(tenant) < quota(tenant)
        )

    def at_quota(self, quota: Callable[[str], int]) -> set[str]:
        """The tenants with as many tasks on runners as ``quota`` allows them."""
        return {tenant for tenant, active in self._active.items() if active >= quota(tenant)}

    # -- tasks on runners ----------------------------------------------------------------

    def active(self, tenant: str) -> int:
        return self._active.get(tenant, 0)

    def activate(self, tenant: str) -> None:
        self._active[tenant] = self._active.get(tenant, 0) + 1

    def release(self, tenant: str) -> None:
        self._active[tenant] = max(0, self._active.get(tenant, 0) - 1)


def check_admission(
    tenant: str,
    size: int,
    *,
    unfinished: int,
    queued_bytes: int,
    max_unfinished: int,
    max_bytes: int,
) -> None:
    """Whether a tenant with ``unfinished`` tasks holding ``queued_bytes`` may have one
    more of ``size`` bytes (counted by one broker, or across brokers by a shared store).

    Raises :class:`TenantBacklogFull` (too many unfinished tasks, or too many bytes
    of them) or :class:`TaskTooLarge` (more bytes than the budget, alone).
    """
    if unfinished >= max_unfinished:
        raise TenantBacklogFull(
            f"Tenant {tenant!r} already has {max_unfinished} unfinished tasks "
            "(the broker's limit); wait for some to finish or cancel some"
        )
    if size > max_bytes:
        raise TaskTooLarge(
            f"The task takes {size} bytes as JSON (code, items, query and outputSchema), "
            f"more than the {max_bytes} bytes a tenant may have queued "
            "(SANDBOX_TENANT_QUEUED_BYTES); send less data per task"
        )
    if queued_bytes + size > max_bytes:
        raise TenantBacklogFull(
            f"Tenant {tenant!r} already has {queued_bytes} bytes of unfinished tasks; "
            f"this one ({size} bytes) would exceed its budget of {max_bytes} bytes "
            "(SANDBOX_TENANT_QUEUED_BYTES); wait for some to start or cancel some"
        )
