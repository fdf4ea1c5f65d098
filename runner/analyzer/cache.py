"""The runner's front door to the analyzer core: verdicts and their cache.

Owns: :class:`Verdict` (what the analyzer concluded about one task's code) and
:class:`Analyzer` (the core's checks behind an LRU cache, like n8n's validation
cache: at most 500 entries keyed by the code's sha256 and the import policy).
:meth:`Analyzer.check` analyzes in the calling thread; the runner's pipeline sends
all but tiny code to worker processes instead (:mod:`runner.analyzer.pool`), through
:meth:`Analyzer.lookup` and :meth:`Analyzer.store`, so the cache stays in the runner.

Must not import: pydantic, asyncio, docker, or anything of the sandbox. The core
(:mod:`runner.analyzer.core`) stays standard-library only; this module is the
runner-side wrapper around it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from runner.analyzer.core import ImportPolicy, Violation, analyze

DEFAULT_CACHE_SIZE = 500  # n8n's MAX_VALIDATION_CACHE_SIZE

CacheKey = tuple[str, tuple[tuple[str, ...], tuple[str, ...]]]


def cache_key(code: str, policy: ImportPolicy) -> CacheKey:
    """``(sha256 hex of the code, the policy's sorted allowlists)``, as n8n keys it."""
    # surrogatepass: code with a lone surrogate must get a verdict, not a crash.
    digest = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
    return digest, policy.cache_key()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The analyzer's conclusion about one piece of task code.

    ``syntax_error`` is ``str(SyntaxError)`` exactly as n8n sends it (for example
    ``"'[' was never closed (<unknown>, line 1)"``); ``violations`` are empty then.
    ``limit_exceeded`` says why the analysis itself was stopped (its worker ran out of
    CPU time or memory, or died): the code is refused without a verdict on its content.
    """

    violations: tuple[Violation, ...] = ()
    syntax_error: str | None = None
    limit_exceeded: str | None = None

    @property
    def is_allowed(self) -> bool:
        return not self.violations and self.syntax_error is None and self.limit_exceeded is None

    @property
    def description(self) -> str:
        """n8n's error description: one ``Line N: <reason>`` per line."""
        return "\n".join(str(violation) for violation in self.violations)


ALLOWED = Verdict()


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


class Analyzer:
    """Checks task code against one import policy, remembering recent verdicts.

    Least-recently-used eviction: a hit moves the entry to the end, a new entry
    beyond ``maxsize`` drops the oldest. Safe to share between threads; two threads
    missing on the same code at once both analyze it, which is harmless.
    """

    def __init__(self, policy: ImportPolicy, maxsize: int = DEFAULT_CACHE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self._policy = policy
        self._maxsize = maxsize
        self._cache: OrderedDict[CacheKey, Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def policy(self) -> ImportPolicy:
        return self._policy

    def check(self, code: str) -> Verdict:
        """The verdict on ``code``: cached, or analyzed here (in the calling thread)."""
        cached = self.lookup(code)
        if cached is not None:
            return cached
        verdict = self._analyze(code)
        self.store(code, verdict)
        return verdict

    def lookup(self, code: str) -> Verdict | None:
        """The cached verdict (a hit), or ``None`` (a miss: analyze, then :meth:`store`)."""
        if self._policy.allows_everything:
            return ALLOWED  # n8n's exemption: nothing to analyze, nothing to cache
        key = cache_key(code, self._policy)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return cached
            self._misses += 1
        return None

    def store(self, code: str, verdict: Verdict) -> None:
        """Remember a verdict reached elsewhere (an analysis worker)."""
        key = cache_key(code, self._policy)
        with self._lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self._maxsize:
                self._cache.popitem(last=False)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._maxsize)

    def _analyze(self, code: str) -> Verdict:
        try:
            return Verdict(violations=analyze(code, self._policy))
        except SyntaxError as exc:
            return Verdict(syntax_error=str(exc))
