"""Per-key token quotas: a token bucket of ``tokens_per_minute`` that refills continuously."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from plm_owner_server.errors import ApiError


class Quotas:
    """Charges each key's work against its tokens-per-minute limit: its own from the keys file,
    else ``default`` (None: never refused)."""

    def __init__(
        self,
        limits: dict[str, int],
        default: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits, self._default, self._clock = limits, default, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens left, at time)

    def charge(self, owner: str, tokens: int) -> None:
        """Take ``tokens`` from the key's bucket, or refuse with 429 and when to retry."""
        limit = self._limits.get(owner, self._default)
        if limit is None:
            return
        if tokens > limit:
            raise ApiError(
                413,
                "over_quota",
                f"this request needs {tokens} tokens but the key's quota is {limit} per minute; "
                "split it into smaller requests",
            )
        now, rate = self._clock(), limit / 60
        left, then = self._buckets.get(owner, (float(limit), now))
        left = min(float(limit), left + (now - then) * rate)
        if tokens > left:
            wait = math.ceil((tokens - left) / rate)
            self._buckets[owner] = (left, now)
            raise ApiError(
                429,
                "quota_exceeded",
                f"this key's quota of {limit} tokens per minute is used up; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._buckets[owner] = (left - tokens, now)
