"""Generation sessions: a KV cache per session, with an idle TTL, a cap per API key and a bound
on the cache memory of all sessions together. Eviction drops the cache; a later use is a 404. A
session whose prompts are still being read (chunked prefill) is in use: never evicted, expired or
reclaimed.
A key at its cap reclaims its own least recently used session once that one has been idle for
``reclaim_s``, so sessions left open by a client that died never lock its key out.

Not thread-safe by design: every method runs on the one model thread.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from plm_owner_server.backend import SessionState
from plm_owner_server.errors import ApiError
from shared.protocol import HiddenDType

log = logging.getLogger(__name__)


@dataclass
class Session:
    owner: str
    state: SessionState
    dtype: HiddenDType
    prompt_len: int  # longest prompt; the cache grows by one position per step
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    steps: int = 0
    nbytes: int = 0
    last_used: float = 0.0
    reserved: int = 0  # while its prompts are read in chunks: its full size, counted meanwhile

    @property
    def opening(self) -> bool:
        """Its prompts are being read: in use, never evicted, expired or reclaimed."""
        return self.reserved > 0


class SessionStore:
    """Sessions by id, least recently used first."""

    def __init__(
        self,
        ttl_s: float,
        max_per_owner: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[SessionStore], None] | None = None,
        reclaim_s: float = 30.0,
    ) -> None:
        self.ttl_s, self.max_per_owner, self.max_bytes = ttl_s, max_per_owner, max_bytes
        self.reclaim_s = reclaim_s
        self._clock = clock
        self._on_change = on_change
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def check_room(self, owner: str, nbytes: int) -> None:
        """Make room for a new session of ``owner``: at the owner's cap, reclaim its least
        recently used session once idle for at least ``reclaim_s``; refuse one that has no slot
        even so (429 with ``Retry-After``), or that could never fit (413)."""
        self.expire()
        if nbytes > self.max_bytes:
            raise ApiError(
                413,
                "session_too_large",
                f"this session needs about {nbytes / 2**20:.1f} MiB of KV cache but the server "
                f"allows {self.max_bytes / 2**20:.1f} MiB in all; send fewer or shorter prompts",
            )
        owned = [s for s in self._sessions.values() if s.owner == owner]  # least recent first
        excess = len(owned) + 1 - self.max_per_owner
        if excess <= 0:
            return
        candidates = [s for s in owned if not s.opening]
        # The session whose reclaiming would make room, unless openings fill the key's cap.
        last = candidates[excess - 1] if excess <= len(candidates) else None
        idle = self._clock() - last.last_used if last is not None else 0.0
        if last is None or idle < self.reclaim_s:
            retry = max(1, math.ceil(self.reclaim_s - idle))
            raise ApiError(
                429,
                "too_many_sessions",
                f"this key has its {self.max_per_owner} sessions open, none idle for "
                f"{self.reclaim_s:g} s; close one with DELETE /v1/sessions/{{id}}, or retry in "
                f"{retry} s: a session idle that long makes room",
                headers={"Retry-After": str(retry)},
            )
        for session in candidates[:excess]:
            log.info("key at its cap of %d sessions: reclaimed an idle one", self.max_per_owner)
            self._drop(session.id, evicted=True)
        self._changed()

    def add(self, session: Session) -> None:
        session.last_used = self._clock()
        self._sessions[session.id] = session
        self.update(session)

    def get(self, session_id: str, owner: str) -> Session:
        """The caller's live session (another key's session is as unknown as a missing one)."""
        self.expire()
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise ApiError(
                404,
                "session_not_found",
                f"session {session_id!r} does not exist, expired after {self.ttl_s:g} s idle, "
                "or was evicted to free memory; open a new one",
            )
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        return session

    def update(self, session: Session) -> None:
        """Re-measure a session's cache and evict the least recently used others to fit."""
        session.nbytes = max(session.state.nbytes, session.reserved)
        for other in list(self._sessions.values()):
            if self.nbytes <= self.max_bytes:
                break
            if other is not session and not other.opening:
                self._drop(other.id, evicted=True)
        if self.nbytes > self.max_bytes:
            self._drop(session.id, evicted=True)
            raise ApiError(
                413,
                "session_too_large",
                f"session outgrew the server's {self.max_bytes >> 20} MiB KV-cache bound and was "
                "closed; use fewer rows or fewer new tokens",
            )
        self._changed()

    def remove(self, session_id: str, owner: str) -> None:
        self.get(session_id, owner)
        self._drop(session_id)
        self._changed()

    def discard(self, session_id: str, evicted: bool = True) -> None:
        """Drop a session whose cache can no longer be trusted, or that nobody can use (no
        owner check); ``evicted``: counted as an eviction."""
        if session_id in self._sessions:
            self._drop(session_id, evicted=evicted)
            self._changed()

    def expire(self) -> int:
        """Drop sessions idle for longer than the TTL; returns how many."""
        deadline = self._clock() - self.ttl_s
        stale = [s.id for s in self._sessions.values() if s.last_used < deadline and not s.opening]
        for session_id in stale:
            self._drop(session_id, evicted=True)
        if stale:
            self._changed()
        return len(stale)

    def _drop(self, session_id: str, evicted: bool = False) -> None:
        self._sessions.pop(session_id)
        self.evicted += evicted

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
