"""Passing self-check reports kept by key, in the process and in a small JSON file
(validated on the way in), so the check costs nothing per task."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from runner.selfcheck.report import GuaranteeResult, SelfCheckReport, Status

log = logging.getLogger(__name__)

# 2: the cpu-limit guarantee; 3: the host's view of the limits, the sandbox kernel
# (gVisor's facts read where it has them), the thread loop stopping exactly at the limit.
CACHE_FORMAT = 3


# -- the cache ----------------------------------------------------------------------


class _CachedGuarantee(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    status: Status
    required: bool
    detail: str


class _CachedReport(BaseModel):
    """The cache file (a trust boundary of sorts: validated on the way in)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int
    key: str
    policySha256: str
    daemonId: str
    checkedAt: str
    durationMs: float
    guarantees: tuple[_CachedGuarantee, ...]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sandbox-runner``, else ``~/.cache/sandbox-runner`` (read when called)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sandbox-runner"


class SelfCheckCache:
    """Passing self-check reports by key: in this process, and in ``directory`` (if any).

    Keep one instance for the life of a process (the service) so that later lookups
    never touch the disk.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, SelfCheckReport] = {}

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"selfcheck-{key[:32]}.json"

    def get(self, key: str) -> SelfCheckReport | None:
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if path is None:
            return None
        try:
            stored = _CachedReport.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None  # missing, unreadable or not ours: run the check again
        if stored.format != CACHE_FORMAT or stored.key != key:
            return None
        report = SelfCheckReport(
            policy_sha256=stored.policySha256,
            daemon_id=stored.daemonId,
            results=tuple(
                GuaranteeResult(g.name, g.status, g.required, g.detail) for g in stored.guarantees
            ),
            checked_at=stored.checkedAt,
            duration_ms=stored.durationMs,
            key=key,
            cached=True,
        )
        if not report.is_ok:
            return None
        self._memory[key] = report
        return report

    def put(self, report: SelfCheckReport) -> None:
        self._memory[report.key] = replace(report, cached=True)
        path = self.path(report.key)
        if path is None:
            return
        document = {
            "format": CACHE_FORMAT,
            "key": report.key,
            "policySha256": report.policy_sha256,
            "daemonId": report.daemon_id,
            "checkedAt": report.checked_at,
            "durationMs": round(report.duration_ms, 1),
            "guarantees": [r.as_json() for r in report.results],
        }
        temporary: str | None = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Atomic replace: a concurrent reader sees the old file or the new one.
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, prefix=".selfcheck-", delete=False, encoding="utf-8"
            ) as handle:
                temporary = handle.name
                json.dump(document, handle, indent=1)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("could not write the self-check cache %s: %s", path, exc)
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
