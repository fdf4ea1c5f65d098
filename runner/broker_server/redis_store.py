"""The broker's task store on Redis: several brokers, on several hosts, share one queue.

Owns: the tasks' keys in Redis and every step on them as one Lua script (atomic on
the server, whoever else runs one), the brokers' leases (each broker renews its own;
a broker whose lease lapsed is dead, and any live one takes its tasks back into the
shared queue), the shared queue with fair turns across tenants, the tenants'
admission counters, retention, and the two channels that tell brokers a task was
queued or finished. The only module that imports :mod:`redis`; its faults become
:class:`~runner.errors.InfrastructureError` here, at the edge.

**What a broker holds.** A task submitted to any broker goes to the shared queue
(``ready:<tenant>``, fair turns in ``tenants``). A broker *claims* tasks from it only
for runner slots it has on offer (:meth:`RedisStore.claim`): a claimed task is owned
by that broker (``owned:<broker>``) until it ends or is handed back
(:meth:`RedisStore.requeue`: its runner declined, left, or the broker drains). Each
broker renews its lease (``alive:<broker>``, ``SANDBOX_BROKER_LEASE_S``) every third
of it; a lease that lapsed means the broker died or was cut off, and the next live
broker to look (:meth:`RedisStore.reclaim`) puts each of its tasks back in the queue:
a queued one as it was (an offer is not recorded here: no settings had left), a
running one at its next attempt (its settings have left, an execution may be
running: as a broker restarting on SQLite does).

**Fencing.** Every step that moves a task is conditional: a lease or a hand-back on
the owner *and* the attempt, a result on the attempt and an unfinished status. A
broker that was cut off longer than its lease finds its tasks gone (the step returns
False: the core drops the task); a runner's late result of an older attempt is not
written (dropped and counted by the core). So a task has exactly one result, whoever
died. A runner whose broker died reconnects to another one and re-sends what it has
not had acknowledged: that broker takes the task over (:meth:`RedisStore.take_over`)
if it is still at that attempt (its lease not yet reclaimed), and the result counts.

**Durability** is Redis's: ``appendonly yes`` with ``appendfsync everysec`` loses at
most a second of steps if the Redis host loses power (a lost result: the task runs
again from its lease; a lost submission was answered 202 and is gone), ``always``
loses nothing and costs an fsync per step (docs/operations.md).

Admission: a tenant's unfinished tasks and their bytes are counted in Redis, across
brokers (the bytes are the whole submission's until the task ends: a single broker
stops counting settings once they are sent). Tenants' quotas of concurrent tasks
and the queue timeout are each broker's, over the tasks it claimed; a task waiting in
the shared queue with no runner anywhere times out when a broker claims it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any, cast

import redis
import redis.asyncio

from runner.broker_server.retry import (
    AttemptError,
    RetryPolicy,
    attempts_of_text,
    attempts_to_text,
)
from runner.broker_server.store import Admission, Recovered, StoredTask, TenantFull
from runner.broker_server.submission import TaskLimits
from runner.errors import InfrastructureError
from runner.sandbox.base import Mode

log = logging.getLogger(__name__)

PREFIX = "sandbox:"  # every key and channel the brokers use
SCHEMA_VERSION = "1"  # PREFIX + "schema": a Redis of another layout is refused
DEFAULT_LEASE_S = 10.0
UNFINISHED = ("queued", "offered", "running")

# -- the scripts (KEYS: none, every key derived from ARGV[1], the prefix; one Redis) -----

# Puts a task back at the front of its tenant's queue (a helper the scripts share).
_REQUEUE_FRONT = """
local function requeue_front(p, id, tenant)
  if redis.call('LPUSH', p..'ready:'..tenant, id) == 1 then
    redis.call('RPUSH', p..'tenants', tenant)
  end
end
"""

# ARGV: prefix, id, tenant, rec, size, max_unfinished, max_bytes, key, claimer (a
# broker with a free slot for it, or ''). A tenant's recent tasks are ordered by a
# sequence of Redis's (a millisecond clock would tie).
_ADD = """
local p, id, tenant = ARGV[1], ARGV[2], ARGV[3]
local key = ARGV[8]
if key ~= '' then
  local existing = redis.call('GET', p..'idem:'..tenant..':'..key)
  if existing then return {'replay', existing} end
end
local c = p..'count:'..tenant
local n = tonumber(redis.call('HGET', c, 'n') or '0')
local b = tonumber(redis.call('HGET', c, 'b') or '0')
local size = tonumber(ARGV[5])
if n >= tonumber(ARGV[6]) or b + size > tonumber(ARGV[7]) then
  return {'full', tostring(n), tostring(b)}
end
redis.call('HINCRBY', c, 'n', 1)
redis.call('HINCRBY', c, 'b', size)
redis.call('HSET', p..'task:'..id, 'rec', ARGV[4], 'tenant', tenant, 'status', 'queued',
  'attempt', 1, 'owner', '', 'runner', '', 'size', size)
if key ~= '' then redis.call('SET', p..'idem:'..tenant..':'..key, id) end
redis.call('ZADD', p..'recent:'..tenant, redis.call('INCR', p..'submitted'), id)
if ARGV[9] ~= '' and redis.call('LLEN', p..'tenants') == 0 then
  -- Nothing waits in the shared queue and the submitting broker has a free slot: it
  -- holds the task at once (a claim saved; no task waiting longer is passed over).
  redis.call('HSET', p..'task:'..id, 'owner', ARGV[9])
  redis.call('SADD', p..'owned:'..ARGV[9], id)
  return {'claimed'}
end
if redis.call('RPUSH', p..'ready:'..tenant, id) == 1 then
  redis.call('RPUSH', p..'tenants', tenant)
end
redis.call('PUBLISH', p..'ready', tenant)
return {'ok'}
"""

# ARGV: prefix, broker, n, skip...: up to n tasks, one per tenant in turn (as a broker's
# own turns), none of the tenants to skip (at their quota on this broker).
_CLAIM = """
local p, me, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local skip = {}
for i = 4, #ARGV do skip[ARGV[i]] = true end
local out = {}
local looked = 0
while #out < n * 4 and looked < n * 4 + 16 + #ARGV do
  looked = looked + 1
  local tenant = redis.call('LMOVE', p..'tenants', p..'tenants', 'LEFT', 'RIGHT')
  if not tenant then break end
  if not skip[tenant] then
    local id = redis.call('LPOP', p..'ready:'..tenant)
    if redis.call('LLEN', p..'ready:'..tenant) == 0 then
      redis.call('LREM', p..'tenants', 0, tenant)
    end
    if id then
      local t = p..'task:'..id
      if redis.call('HGET', t, 'status') == 'queued' and redis.call('HGET', t, 'owner') == ''
      then
        redis.call('HSET', t, 'owner', me)
        redis.call('SADD', p..'owned:'..me, id)
        local f = redis.call('HMGET', t, 'rec', 'attempt', 'attempts')
        table.insert(out, id)
        table.insert(out, f[1])
        table.insert(out, f[2])
        table.insert(out, f[3] or '')
      end
    end
  end
end
return out
"""

# ARGV: prefix, broker, id, attempt, status, runner
_LEASE = """
local p, me, t = ARGV[1], ARGV[2], ARGV[1]..'task:'..ARGV[3]
local f = redis.call('HMGET', t, 'owner', 'attempt', 'status')
if f[1] ~= me or tonumber(f[2]) ~= tonumber(ARGV[4]) then return 0 end
if f[3] ~= 'queued' and f[3] ~= 'offered' and f[3] ~= 'running' then return 0 end
redis.call('HSET', t, 'status', ARGV[5], 'runner', ARGV[6])
return 1
"""

# ARGV: prefix, broker, id, attempt. Back to the shared queue's front, owned by none.
_REQUEUE = (
    _REQUEUE_FRONT
    + """
local p, me, id = ARGV[1], ARGV[2], ARGV[3]
local t = p..'task:'..id
local f = redis.call('HMGET', t, 'owner', 'attempt', 'status', 'tenant')
if f[1] ~= me or tonumber(f[2]) ~= tonumber(ARGV[4]) then return 0 end
if f[3] ~= 'queued' and f[3] ~= 'offered' and f[3] ~= 'running' then return 0 end
redis.call('HSET', t, 'status', 'queued', 'owner', '', 'runner', '')
redis.call('SREM', p..'owned:'..me, id)
requeue_front(p, id, f[4])
redis.call('PUBLISH', p..'ready', f[4])
return 1
"""
)

# ARGV: prefix, broker, id, attempt, attempts. The broker keeps it for its back-off.
_RETRY = """
local p, me, t = ARGV[1], ARGV[2], ARGV[1]..'task:'..ARGV[3]
local f = redis.call('HMGET', t, 'owner', 'attempt', 'status')
if f[1] ~= me or tonumber(f[2]) ~= tonumber(ARGV[4]) then return 0 end
if f[3] ~= 'queued' and f[3] ~= 'offered' and f[3] ~= 'running' then return 0 end
redis.call('HSET', t, 'status', 'queued', 'attempt', tonumber(ARGV[4]) + 1, 'runner', '',
  'attempts', ARGV[5])
return 1
"""

# ARGV: prefix, id, attempt, status, document, attempts, max_kept, max_bytes, unowned
# ('1': only a task no broker holds -- a cancel in the shared queue). The task's
# settings and schema go (kept until it ends: a reclaimed task runs from them).
_FINISH = """
local p, id = ARGV[1], ARGV[2]
local t = p..'task:'..id
local f = redis.call('HMGET', t, 'owner', 'attempt', 'status', 'tenant', 'size')
if tonumber(f[2]) ~= tonumber(ARGV[3]) then return 0 end
if f[3] ~= 'queued' and f[3] ~= 'offered' and f[3] ~= 'running' then return 0 end
if ARGV[9] == '1' and f[1] ~= '' then return 0 end
local tenant = f[4]
local rec = cjson.decode(redis.call('HGET', t, 'rec'))
rec['settings'] = cjson.null
rec['outputSchema'] = cjson.null
redis.call('HSET', t, 'status', ARGV[4], 'doc', ARGV[5], 'attempts', ARGV[6],
  'rec', cjson.encode(rec), 'owner', '')
if f[1] ~= '' then redis.call('SREM', p..'owned:'..f[1], id) end
if f[3] == 'queued' and f[1] == '' then redis.call('LREM', p..'ready:'..tenant, 0, id) end
local c = p..'count:'..tenant
redis.call('HINCRBY', c, 'n', -1)
redis.call('HINCRBY', c, 'b', -tonumber(f[5]))
local fin, kept = p..'finished:'..tenant, p..'kept:'..tenant
redis.call('ZADD', fin, redis.call('INCR', p..'seq'), id)
local bytes = redis.call('HINCRBY', kept, 'b', string.len(ARGV[5]))
local gone = 0
while true do
  local count = redis.call('ZCARD', fin)
  if count <= tonumber(ARGV[7]) and (bytes <= tonumber(ARGV[8]) or count <= 1) then break end
  local oldest = redis.call('ZPOPMIN', fin)[1]
  local o = p..'task:'..oldest
  local doc = redis.call('HGET', o, 'doc') or ''
  bytes = redis.call('HINCRBY', kept, 'b', -string.len(doc))
  local rec = redis.call('HGET', o, 'rec')
  if rec then
    local key = cjson.decode(rec)['idempotencyKey']
    if key and key ~= cjson.null then redis.call('DEL', p..'idem:'..tenant..':'..key) end
  end
  redis.call('DEL', o)
  redis.call('ZREM', p..'recent:'..tenant, oldest)
  gone = gone + 1
end
redis.call('PUBLISH', p..'done', id)
return 1
"""

# ARGV: prefix, broker, id, attempt, runner. A runner's completion for a task this
# broker does not hold (its broker died): taken over if still at that attempt.
_TAKE_OVER = """
local p, me, id = ARGV[1], ARGV[2], ARGV[3]
local t = p..'task:'..id
local f = redis.call('HMGET', t, 'owner', 'attempt', 'status', 'rec', 'attempts')
if tonumber(f[2]) ~= tonumber(ARGV[4]) then return false end
if f[3] ~= 'offered' and f[3] ~= 'running' then return false end
if f[1] ~= '' then redis.call('SREM', p..'owned:'..f[1], id) end
redis.call('HSET', t, 'owner', me, 'status', 'running', 'runner', ARGV[5])
redis.call('SADD', p..'owned:'..me, id)
return {f[4], f[2], f[5] or ''}
"""

# A task broker b held, back in the queue: a queued one as it was, a running one at
# its next attempt. What it was ('queued', 'requeued'), or nil.
_GIVE_BACK = (
    _REQUEUE_FRONT
    + """
local function give_back(p, b, id)
  redis.call('SREM', p..'owned:'..b, id)
  local t = p..'task:'..id
  local f = redis.call('HMGET', t, 'status', 'attempt', 'tenant', 'owner')
  if f[4] ~= b then return nil end
  if f[1] ~= 'queued' and f[1] ~= 'offered' and f[1] ~= 'running' then return nil end
  local was = 'queued'
  if f[1] == 'queued' then
    redis.call('HSET', t, 'owner', '', 'runner', '')
  else
    was = 'requeued'
    redis.call('HSET', t, 'status', 'queued', 'attempt', tonumber(f[2]) + 1, 'owner', '',
      'runner', '')
  end
  requeue_front(p, id, f[3])
  return was
end
"""
)

# ARGV: prefix, broker, only (a broker id: that one, alive or not; '': every dead one)
_RECLAIM = (
    _GIVE_BACK
    + """
local p, me, only = ARGV[1], ARGV[2], ARGV[3]
local brokers = {}
if only ~= '' then
  brokers = {only}
else
  for _, b in ipairs(redis.call('SMEMBERS', p..'brokers')) do
    if b ~= me and redis.call('EXISTS', p..'alive:'..b) == 0 then table.insert(brokers, b) end
  end
end
local queued, requeued = 0, 0
for _, b in ipairs(brokers) do
  for _, id in ipairs(redis.call('SMEMBERS', p..'owned:'..b)) do
    local was = give_back(p, b, id)
    if was == 'queued' then queued = queued + 1 elseif was == 'requeued' then
      requeued = requeued + 1
    end
  end
  redis.call('DEL', p..'owned:'..b)
  redis.call('SREM', p..'brokers', b)
  redis.call('DEL', p..'alive:'..b)
end
if queued + requeued > 0 then redis.call('PUBLISH', p..'ready', '') end
return {#brokers, queued, requeued}
"""
)

# ARGV: prefix, broker, ids...: tasks the store has as this broker's that it does not
# hold (a hand-back the store missed while it was unreachable), given back.
_GIVE_BACK_IDS = (
    _GIVE_BACK
    + """
local p, me = ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  if give_back(p, me, ARGV[i]) then n = n + 1 end
end
if n > 0 then redis.call('PUBLISH', p..'ready', '') end
return n
"""
)


def _fault(doing: str, exc: BaseException) -> InfrastructureError:
    return InfrastructureError(f"The broker's Redis task store failed {doing}", hint=str(exc))


def default_broker_id() -> str:
    """A broker's name in Redis and in logs: host, pid and a random suffix (a
    restarted broker is another one: its predecessor's tasks are reclaimed)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _rec(task: StoredTask) -> str:
    """What does not change while a task lives (and its settings until it ends)."""
    limits = task.limits
    return json.dumps(
        {
            "tenant": task.tenant,
            "mode": task.mode.value,
            "limits": [limits.timeout_s, limits.memory_mb, limits.cpus],
            "submittedWall": task.submitted_wall.isoformat(),
            "settings": task.settings,
            "outputSchema": task.output_schema,
            "idempotencyKey": task.idempotency_key,
            "fingerprint": task.fingerprint,
            "retry": None if task.retry is None else task.retry.as_json(),
        },
        separators=(",", ":"),
    )


def _stored(task_id: str, fields: dict[str, str]) -> StoredTask:
    rec = json.loads(fields["rec"])
    timeout_s, memory_mb, cpus = rec["limits"]
    return StoredTask(
        task_id=task_id,
        tenant=rec["tenant"],
        mode=Mode(rec["mode"]),
        limits=TaskLimits(timeout_s, memory_mb, cpus),
        submitted_wall=datetime.fromisoformat(rec["submittedWall"]),
        status=fields.get("status", "queued"),
        attempt=int(fields.get("attempt", "1")),
        runner_id=fields.get("runner") or None,
        settings=rec["settings"],
        output_schema=rec["outputSchema"],
        document_json=fields.get("doc"),
        idempotency_key=rec["idempotencyKey"],
        fingerprint=rec["fingerprint"],
        retry=None if rec["retry"] is None else RetryPolicy.from_json(rec["retry"]),
        attempts=attempts_of_text(fields.get("attempts") or None),
    )


class RedisStore:
    """The store at ``url`` (``redis://HOST:PORT/DB``), shared by every broker on it.

    ``broker_id``: this broker's name (:func:`default_broker_id`); ``lease_s``: how
    long its lease lasts unrenewed. Each tenant's admission and retention limits,
    applied across brokers, are those of the configuration of the core that uses the
    store (:meth:`set_limits`).
    """

    is_durable = True
    is_shared = True

    def __init__(
        self,
        url: str,
        *,
        broker_id: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.url = url
        self.broker_id = broker_id or default_broker_id()
        self.lease_s = lease_s
        self._limits: tuple[int, int, int, int] | None = None  # set_limits
        try:
            # (Typed Any: redis-py's stubs type every answer bytes | str; with
            # decode_responses they are str, checked where they are parsed.)
            self._redis: Any = redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0
            )
            self._check_schema()
        except redis.RedisError as exc:
            raise InfrastructureError(
                f"Cannot reach the broker's Redis task store {self.location}",
                hint=f"{exc}; check SANDBOX_BROKER_STORE (redis://HOST:PORT/DB) and that "
                "Redis 6.2 or later answers there",
            ) from exc
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("add", _ADD),
                ("claim", _CLAIM),
                ("lease", _LEASE),
                ("requeue", _REQUEUE),
                ("retry", _RETRY),
                ("finish", _FINISH),
                ("take_over", _TAKE_OVER),
                ("reclaim", _RECLAIM),
                ("give_back", _GIVE_BACK_IDS),
            )
        }
        self.renew()

    def set_limits(
        self, *, max_unfinished: int, max_bytes: int, max_kept: int, max_retained_bytes: int
    ) -> None:
        """Each tenant's admission (unfinished tasks, their bytes) and retention (kept
        results, their bytes), applied here across brokers."""
        self._limits = (max_unfinished, max_bytes, max_kept, max_retained_bytes)

    @property
    def location(self) -> str:
        """The URL without its password (logs and errors)."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    def _check_schema(self) -> None:
        version = self._redis.get(PREFIX + "schema")
        if version is None:
            self._redis.set(PREFIX + "schema", SCHEMA_VERSION, nx=True)
        elif version != SCHEMA_VERSION:
            raise InfrastructureError(
                f"The broker's Redis task store {self.location} has layout version "
                f"{version}, this broker reads version {SCHEMA_VERSION}",
                hint="it was written by another version of sandbox-runner",
            )

    def _run(self, name: str, doing: str, *args: object) -> Any:
        try:
            return self._scripts[name](args=[PREFIX, *cast(tuple[Any, ...], args)])
        except redis.RedisError as exc:
            raise _fault(doing, exc) from exc

    # -- the brokers' leases ------------------------------------------------------------

    def renew(self) -> None:
        """This broker is alive for another ``lease_s``."""
        try:
            pipe = self._redis.pipeline()
            pipe.set(PREFIX + "alive:" + self.broker_id, "1", px=int(self.lease_s * 1000))
            pipe.sadd(PREFIX + "brokers", self.broker_id)
            pipe.execute()
        except redis.RedisError as exc:
            raise _fault("to renew the broker's lease", exc) from exc

    def reclaim(self) -> tuple[int, int, int]:
        """Every dead broker's tasks back in the shared queue: (brokers, queued tasks,
        running ones, now at their next attempt)."""
        brokers, queued, requeued = self._run("reclaim", "to reclaim tasks", self.broker_id, "")
        if brokers:
            log.warning(
                "reclaimed the tasks of %d broker(s) whose lease lapsed: %d queued, %d "
                "running (queued again at their next attempt)",
                brokers,
                queued,
                requeued,
            )
        return int(brokers), int(queued), int(requeued)

    # -- the TaskStore steps --------------------------------------------------------------

    def recover(self) -> Recovered:
        """Nothing to take over at start: the shared queue is claimed from as runner
        slots come (:meth:`claim`), results are read where they are."""
        return Recovered()

    def add(self, task: StoredTask) -> None:
        """A new task in the shared queue (the seam's step; the core submits through
        :meth:`submit`, which also says whether a key already named a task)."""
        self.submit(task, claim=False)

    def submit(self, task: StoredTask, *, claim: bool) -> tuple[str, str | None]:
        """:meth:`add`, saying how: ``("queued", None)``, ``("claimed", None)`` (``claim``:
        this broker has a free slot for it, and nothing waits in the shared queue: it
        holds the task at once) or ``("replay", the id its key names)``."""
        assert self._limits is not None, "set_limits first"
        max_unfinished, max_bytes, _, _ = self._limits
        size = len(task.settings or "") + len(task.output_schema or "")
        answer = self._run(
            "add",
            "to keep a new task",
            task.task_id,
            task.tenant,
            _rec(task),
            size,
            max_unfinished,
            max_bytes,
            task.idempotency_key or "",
            self.broker_id if claim else "",
        )
        if answer[0] == "replay":
            return "replay", str(answer[1])
        if answer[0] == "full":
            raise TenantFull(Admission(int(answer[1]), int(answer[2])))
        return ("claimed" if answer[0] == "claimed" else "queued"), None

    def claim(self, count: int, skip: Iterable[str] = ()) -> list[StoredTask]:
        """Up to ``count`` queued tasks, now this broker's, one per tenant in turn; none
        of the tenants in ``skip`` (at their quota on this broker)."""
        if count <= 0:
            return []
        flat = self._run("claim", "to claim queued tasks", self.broker_id, count, *sorted(skip))
        claimed = []
        for i in range(0, len(flat), 4):
            task_id, rec, attempt, attempts = flat[i : i + 4]
            fields = {"rec": rec, "attempt": attempt, "attempts": attempts}
            claimed.append(_stored(task_id, fields))
        return claimed

    def lease(self, task_id: str, attempt: int, runner_id: str, *, running: bool) -> bool:
        status = "running" if running else "offered"
        return bool(
            self._run(
                "lease", "to record a lease", self.broker_id, task_id, attempt, status, runner_id
            )
        )

    def requeue(self, task_id: str, attempt: int) -> bool:
        """Back to the shared queue (any broker may claim it)."""
        return bool(self._run("requeue", "to requeue a task", self.broker_id, task_id, attempt))

    def retry(self, task_id: str, attempt: int, attempts: tuple[AttemptError, ...]) -> bool:
        text = attempts_to_text(attempts) or ""
        return bool(
            self._run(
                "retry", "to queue a task for its retry", self.broker_id, task_id, attempt, text
            )
        )

    def finish(
        self,
        task_id: str,
        attempt: int,
        status: str,
        document_json: str,
        attempts: tuple[AttemptError, ...] = (),
        *,
        unowned: bool = False,
    ) -> bool:
        """The result, if the task is at ``attempt`` and unfinished (``unowned``: and no
        broker holds it); False otherwise."""
        assert self._limits is not None, "set_limits first"
        _, _, max_kept, max_retained = self._limits
        return bool(
            self._run(
                "finish",
                "to keep a result",
                task_id,
                attempt,
                status,
                document_json,
                attempts_to_text(attempts) or "",
                max_kept,
                max_retained,
                "1" if unowned else "",
            )
        )

    def take_over(self, task_id: str, attempt: int, runner_id: str) -> StoredTask | None:
        """The task a runner reports ``attempt`` of, now this broker's (running on
        ``runner_id``), if it is still at that attempt; else None (stale, or ended)."""
        answer = self._run(
            "take_over", "to take a task over", self.broker_id, task_id, attempt, runner_id
        )
        if not answer:
            return None
        rec, attempt_text, attempts = answer
        fields = {"rec": rec, "attempt": attempt_text, "attempts": attempts, "status": "running"}
        return _stored(task_id, {**fields, "runner": runner_id})

    def forget(self, task_ids: Iterable[str]) -> None:
        """Retention is the store's own here (at each result, across brokers)."""

    # -- reads, from any broker ---------------------------------------------------------

    def load(self, task_id: str) -> StoredTask | None:
        try:
            fields = cast(dict[str, str], self._redis.hgetall(PREFIX + "task:" + task_id))
        except redis.RedisError as exc:
            raise _fault("to read a task", exc) from exc
        return _stored(task_id, fields) if fields.get("rec") else None

    def by_key(self, tenant: str, key: str) -> StoredTask | None:
        try:
            task_id = self._redis.get(f"{PREFIX}idem:{tenant}:{key}")
        except redis.RedisError as exc:
            raise _fault("to read an idempotency key", exc) from exc
        return None if task_id is None else self.load(str(task_id))

    def recent(self, tenant: str, limit: int, status: str | None = None) -> list[StoredTask]:
        """The tenant's newest tasks (only those in ``status``), newest first: among its
        newest ``limit`` (or, with ``status``, its newest 10 x ``limit``)."""
        try:
            span = limit if status is None else limit * 10
            ids = self._redis.zrevrange(f"{PREFIX}recent:{tenant}", 0, span - 1)
            pipe = self._redis.pipeline()
            for task_id in ids:
                pipe.hgetall(PREFIX + "task:" + task_id)
            rows = pipe.execute()
        except redis.RedisError as exc:
            raise _fault("to list tasks", exc) from exc
        tasks = [_stored(i, f) for i, f in zip(ids, rows, strict=True) if f.get("rec")]
        return [t for t in tasks if status is None or t.status == status][:limit]

    def give_back_orphans(self, held: set[str]) -> int:
        """Tasks the store has as this broker's that it does not hold (``held``: those
        it does), back in the queue (a running one at its next attempt): a hand-back
        the store missed while it was unreachable. How many."""
        try:
            owned = set(self._redis.smembers(PREFIX + "owned:" + self.broker_id))
        except redis.RedisError as exc:
            raise _fault("to list the broker's tasks", exc) from exc
        orphans = sorted(owned - held)
        if not orphans:
            return 0
        given = int(self._run("give_back", "to give tasks back", self.broker_id, *orphans))
        if given:
            log.warning("%d task(s) this broker no longer held given back to the queue", given)
        return given

    # -- channels -----------------------------------------------------------------------

    def publish_cancel(self, task_id: str) -> None:
        """Ask the broker that holds ``task_id`` to cancel it."""
        try:
            self._redis.publish(PREFIX + "cancel", task_id)
        except redis.RedisError as exc:
            raise _fault("to pass a cancel on", exc) from exc

    async def listen(self) -> AsyncIterator[tuple[str, str]]:
        """(channel, message) as they come: ``ready`` (a tenant's task was queued),
        ``done`` (a task id finished), ``cancel`` (a task id to cancel). Ends when
        cancelled; a fault of Redis is raised as :class:`InfrastructureError`."""
        client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(PREFIX + "ready", PREFIX + "done", PREFIX + "cancel")
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                yield str(message["channel"]).removeprefix(PREFIX), str(message["data"])
        except redis.RedisError as exc:
            raise _fault("to listen to the other brokers", exc) from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    def close(self) -> None:
        """Hand every task this broker still holds back to the queue (a running one at
        its next attempt), end its lease, disconnect."""
        with contextlib.suppress(redis.RedisError, InfrastructureError):
            self._run("reclaim", "to hand tasks back", self.broker_id, self.broker_id)
        with contextlib.suppress(redis.RedisError):
            self._redis.close()
