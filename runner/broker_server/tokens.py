"""Grant tokens: single-use, short-lived, exchanged for the shared auth token.

As n8n's broker: 32 random bytes as 64 hex characters, valid for a TTL, consumed by
the first WebSocket upgrade that presents it. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable


class GrantTokens:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._tokens: dict[str, float] = {}

    def issue(self) -> str:
        self._purge()
        token = secrets.token_hex(32)
        self._tokens[token] = self._clock() + self._ttl_s
        return token

    def consume(self, token: str) -> bool:
        """True exactly once per issued, unexpired token."""
        self._purge()
        return self._tokens.pop(token, None) is not None

    def _purge(self) -> None:
        now = self._clock()
        self._tokens = {token: until for token, until in self._tokens.items() if until > now}


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison; a length mismatch is simply unequal."""
    return hmac.compare_digest(given.encode(), expected.encode())
