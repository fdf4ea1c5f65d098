"""The broker's task store in one SQLite file: one broker, nothing to install, durable.

Owns: the file (its schema, its version, its permissions), the lock that keeps a
second broker off it, and the :class:`~runner.broker_server.store.TaskStore` steps
as SQL. The only module that imports :mod:`sqlite3`; its faults become
:class:`~runner.errors.InfrastructureError` here, at the edge.

**Durability.** WAL journal (writers never block on readers, a commit is one append),
``synchronous=NORMAL`` for every step but two, which commit with ``synchronous=FULL``
(an fsync of the WAL): :meth:`SqliteStore.add` (the client is about to be told its
task was accepted) and a running lease (the task's settings are about to leave for a
runner: an execution may start under that attempt). That is where a promise is made.
A FULL commit also makes every earlier commit durable (the WAL is one file, written
in order). The rest (offers, requeues, results, evictions) rides on the next fsync
or on the kernel's write-back:

- the process killed (SIGKILL, OOM, a bug): nothing is lost, the WAL is in the
  kernel's page cache;
- the machine losing power or its kernel: SQLite keeps the file consistent, and the
  tail of NORMAL commits after the last fsync may be lost. A lost result means its
  task runs again (its running lease was durable, so it comes back at the next
  attempt; tasks have no network and no storage, so running one twice is invisible
  but for the CPU); a lost offer or requeue leaves a queued task (no settings had
  left). FULL everywhere would cost four fsyncs per task in the broker's event loop
  instead of two, for nothing a recovery needs.

**One broker per file**: an exclusive ``flock`` on ``<file>.lock`` for the store's
life (released by the kernel when the process dies, SIGKILL included); a second
broker on the same file is refused at start, naming the first one's pid.

**Schema versions**: ``PRAGMA user_version``. Version 2 added each task's retry
policy and its failed attempts' errors (two JSON columns); a version-1 file is
migrated in place when a broker opens it (its tasks have no policy), a file of any
other version is refused, so that an older broker never misreads a newer file (a
``dead`` task, say).

**Permissions**: the file holds tenants' code, data and results. Its directory is
made 0700 and the file 0600, before SQLite opens it; SQLite gives its ``-wal`` and
``-shm`` files the database file's mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.broker_server.retry import (
    AttemptError,
    RetryPolicy,
    attempts_of_text,
    attempts_to_text,
)
from runner.broker_server.store import Recovered, StoredTask
from runner.broker_server.submission import TaskLimits
from runner.errors import InfrastructureError
from runner.sandbox.base import Mode

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # PRAGMA user_version; 1 is migrated, any other version refused
UNFINISHED = ("queued", "offered", "running")

SCHEMA = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    task_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    mode TEXT NOT NULL,
    timeout_s REAL,
    memory_mb INTEGER,
    cpus REAL,
    submitted_wall TEXT NOT NULL,           -- ISO 8601, UTC
    status TEXT NOT NULL,                   -- queued, offered, running, success, error, dead
    attempt INTEGER NOT NULL,
    runner_id TEXT,
    settings TEXT,                          -- JSON text, until the task finishes
    output_schema TEXT,
    document TEXT,                          -- the result document, once finished
    finished_seq INTEGER,                   -- finish order, for retention
    idempotency_key TEXT,
    fingerprint TEXT,
    retry TEXT,                             -- the retry policy as JSON (version 2)
    attempts TEXT                           -- failed attempts' errors as JSON (version 2)
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_finished ON tasks (finished_seq) WHERE finished_seq IS NOT NULL;
"""

COLUMNS = (
    "task_id, tenant, mode, timeout_s, memory_mb, cpus, submitted_wall, status, attempt, "
    "runner_id, settings, output_schema, document, idempotency_key, fingerprint, retry, "
    "attempts"
)
# What version 2 added to version 1: columns, each NULL for a task of version 1.
ADDED_IN_2 = ("retry TEXT", "attempts TEXT")


def _fault(path: Path, doing: str, exc: BaseException) -> InfrastructureError:
    return InfrastructureError(f"The broker's task store {path} failed {doing}", hint=str(exc))


def _elsewhere(reason: str) -> str:
    """The hint of a store that cannot be made or written where the settings put it:
    which setting moves it (the operator's fix), and as whom the broker runs (a
    container's user is often not the owner of the directory it was given)."""
    return (
        f"{reason}; give the broker a file in a directory uid {os.geteuid()} can write: "
        "SANDBOX_BROKER_STORE=sqlite:////that/dir/broker-tasks.sqlite3 (or "
        "SANDBOX_STATE_DIR for the default file there; in a container, mount a volume "
        "there), or SANDBOX_BROKER_STORE=memory to keep nothing across a restart"
    )


class SqliteStore:
    """The store in the SQLite file ``path`` (made, with its directory, when missing)."""

    is_durable = True
    is_shared = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd = self._lock()
        try:
            self._db = self._open()
            self._finished_seq = self._db.execute(
                "SELECT COALESCE(MAX(finished_seq), 0) FROM tasks"
            ).fetchone()[0]
        except OSError as exc:  # the file itself: a directory, another user's, read-only
            os.close(self._lock_fd)
            raise InfrastructureError(
                f"Cannot create the broker's task store {path}",
                hint=_elsewhere(exc.strerror or str(exc)),
            ) from exc
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise InfrastructureError(
                f"The broker's task store {path} failed to open", hint=_elsewhere(str(exc))
            ) from exc
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def location(self) -> str:
        return str(self.path)

    # -- opening ----------------------------------------------------------------------

    def _lock(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InfrastructureError(
                f"Cannot create the broker's task store in {self.path.parent}",
                hint=_elsewhere(exc.strerror or str(exc)),
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InfrastructureError(
                f"Another broker uses the task store {self.path} (pid {holder})",
                hint="one broker per SQLite store: stop it, or give this one its own file "
                "(SANDBOX_BROKER_STORE=sqlite:////another/file.sqlite3) or "
                "SANDBOX_BROKER_STORE=memory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def _open(self) -> sqlite3.Connection:
        # The file exists with mode 0600 before SQLite opens it (it would use the umask).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: no implicit transactions; each step opens its own.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode here (got {mode})")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                with self._transaction(db, durable=True):
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:
                self._migrate_from_1(db)
            elif version != SCHEMA_VERSION:
                raise InfrastructureError(
                    f"The broker's task store {self.path} has schema version {version}, "
                    f"this broker reads version {SCHEMA_VERSION}",
                    hint="it was written by another version of sandbox-runner",
                )
        except BaseException:
            db.close()
            raise
        return db

    def _migrate_from_1(self, db: sqlite3.Connection) -> None:
        """Version 1 -> 2: the retry columns added (a column already there is kept)."""
        with self._transaction(db, durable=True):
            present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            for column in ADDED_IN_2:
                if column.split()[0] not in present:
                    db.execute(f"ALTER TABLE tasks ADD COLUMN {column}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("task store %s: schema migrated from version 1 to %d", self.path, SCHEMA_VERSION)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection, *, durable: bool = False) -> Iterator[None]:
        """One atomic step; ``durable``: committed with an fsync of the WAL."""
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) may leave the transaction open: end it, so
                # the next step can begin one.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA synchronous=NORMAL")

    @contextlib.contextmanager
    def _step(self, doing: str, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            with self._transaction(self._db, durable=durable):
                yield self._db
        except sqlite3.Error as exc:
            raise _fault(self.path, doing, exc) from exc

    # -- the steps --------------------------------------------------------------------

    def recover(self) -> Recovered:
        with self._step("to recover its tasks", durable=True) as db:
            requeued = db.execute(
                "UPDATE tasks SET status = 'queued', attempt = attempt + 1, runner_id = NULL "
                "WHERE status IN ('offered', 'running')"
            ).rowcount
            unfinished = [
                _task(row)
                for row in db.execute(
                    f"SELECT {COLUMNS} FROM tasks WHERE status = 'queued' ORDER BY seq"  # noqa: S608 (constant columns)
                )
            ]
            finished = [
                _task(row)
                for row in db.execute(
                    f"SELECT {COLUMNS} FROM tasks WHERE finished_seq IS NOT NULL "  # noqa: S608 (constant columns)
                    "ORDER BY finished_seq"
                )
            ]
        return Recovered(unfinished, finished, requeued)

    def add(self, task: StoredTask) -> None:
        limits = task.limits
        with self._step("to keep a new task", durable=True) as db:
            db.execute(
                f"INSERT INTO tasks ({COLUMNS}) VALUES "  # noqa: S608 (constant columns; values bound)
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task.task_id,
                    task.tenant,
                    task.mode.value,
                    limits.timeout_s,
                    limits.memory_mb,
                    limits.cpus,
                    task.submitted_wall.isoformat(),
                    task.status,
                    task.attempt,
                    task.runner_id,
                    task.settings,
                    task.output_schema,
                    task.document_json,
                    task.idempotency_key,
                    task.fingerprint,
                    None if task.retry is None else json.dumps(task.retry.as_json()),
                    attempts_to_text(task.attempts),
                ),
            )

    # The broker's memory is the fence on a file only it uses: a step is always its own.

    def lease(self, task_id: str, attempt: int, runner_id: str, *, running: bool) -> bool:
        status = "running" if running else "offered"
        with self._step(f"to record a lease ({status})", durable=running) as db:
            db.execute(
                "UPDATE tasks SET status = ?, runner_id = ? WHERE task_id = ? AND attempt = ?",
                (status, runner_id, task_id, attempt),
            )
        return True

    def requeue(self, task_id: str, attempt: int) -> bool:
        with self._step("to requeue a task") as db:
            db.execute(
                "UPDATE tasks SET status = 'queued', runner_id = NULL "
                "WHERE task_id = ? AND attempt = ?",
                (task_id, attempt),
            )
        return True

    def retry(self, task_id: str, attempt: int, attempts: tuple[AttemptError, ...]) -> bool:
        # NORMAL, as a requeue: lost with the machine's power, the task comes back from
        # its durable running lease at the next attempt anyway (one attempt's error less).
        with self._step("to queue a task again for its retry") as db:
            db.execute(
                "UPDATE tasks SET status = 'queued', attempt = attempt + 1, runner_id = NULL, "
                "attempts = ? WHERE task_id = ? AND attempt = ? "
                "AND status IN ('queued', 'offered', 'running')",
                (attempts_to_text(attempts), task_id, attempt),
            )
        return True

    def finish(
        self,
        task_id: str,
        attempt: int,
        status: str,
        document_json: str,
        attempts: tuple[AttemptError, ...] = (),
    ) -> bool:
        with self._step("to keep a result") as db:
            written = db.execute(
                "UPDATE tasks SET status = ?, document = ?, finished_seq = ?, settings = NULL, "
                "output_schema = NULL, attempts = ? WHERE task_id = ? AND attempt = ? "
                "AND status IN ('queued', 'offered', 'running')",
                (
                    status,
                    document_json,
                    self._finished_seq + 1,
                    attempts_to_text(attempts),
                    task_id,
                    attempt,
                ),
            ).rowcount
        if written:
            self._finished_seq += 1
        return bool(written)

    def forget(self, task_ids: Iterable[str]) -> None:
        ids = [(task_id,) for task_id in task_ids]
        if ids:
            with self._step("to forget evicted tasks") as db:
                db.executemany("DELETE FROM tasks WHERE task_id = ?", ids)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _task(row: tuple[Any, ...]) -> StoredTask:
    (
        task_id,
        tenant,
        mode,
        timeout_s,
        memory_mb,
        cpus,
        submitted_wall,
        status,
        attempt,
        runner_id,
        settings,
        output_schema,
        document,
        idempotency_key,
        fingerprint,
        retry,
        attempts,
    ) = row
    return StoredTask(
        task_id=task_id,
        tenant=tenant,
        mode=Mode(mode),
        limits=TaskLimits(timeout_s, memory_mb, cpus),
        submitted_wall=datetime.fromisoformat(submitted_wall),
        status=status,
        attempt=attempt,
        runner_id=runner_id,
        settings=settings,
        output_schema=output_schema,
        document_json=document,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        retry=None if retry is None else RetryPolicy.from_json(json.loads(retry)),
        attempts=attempts_of_text(attempts),
    )
