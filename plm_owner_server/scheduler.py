"""One scheduler for all model work of all API keys.

Requests queue per key. Each iteration takes work round-robin across keys (one job per key per
round, starting with a different key each iteration) until the padded-token budget is spent, then
runs it grouped by kind: every session step of every key in one pass, every session opening in one
pass, every ``/v1/represent`` row in as few passes as the budget allows. Steps run first, so a
decoding client never waits behind a long prefill of the same iteration. A job costlier than the
budget runs alone; a session steps at most once per iteration; work whose caller went away is
dropped. An iteration is whatever queued while the last one ran, with one exception: the sessions
of the last step pass are given a moment (a quarter of that pass's time, at most ``LINGER_MAX_S``)
to send their next step, because their clients answer a few milliseconds apart. Without it,
decoding clients that share one pass drift into several ragged passes, each reading all weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["step", "open", "represent"]
KINDS: tuple[Kind, ...] = ("step", "open", "represent")  # the order passes run in

log = logging.getLogger(__name__)
LINGER_SHARE = 0.25  # of the last step pass's time, waited for its sessions' next steps
LINGER_MAX_S = 0.05

# Runs one kind's jobs on the model; one result (or the exception to raise) per job.
Execute = Callable[[Kind, Sequence[Any]], Awaitable[Sequence[Any]]]


@dataclass
class Work:
    owner: str
    kind: Kind
    job: Any
    cost: int  # padded tokens the job adds to a pass
    session: str | None = None  # a step's session: one step per session per iteration
    future: asyncio.Future[Any] = field(default_factory=asyncio.Future)


class Scheduler:
    def __init__(
        self,
        execute: Execute,
        budget: int,
        observe: Callable[[Kind, Sequence[Work]], None] = lambda kind, works: None,
    ) -> None:
        self._execute, self._budget, self._observe = execute, budget, observe
        self._queues: OrderedDict[str, deque[Work]] = OrderedDict()
        self._stepped: set[str] = set()  # the sessions of the last step pass
        self._linger = 0.0  # seconds to wait for them, from that pass's time
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pema-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._queues.values():  # nobody will run these any more
            for work in queue:
                if not work.future.done():
                    work.future.set_exception(RuntimeError("the server is shutting down"))
        self._queues.clear()

    def depth(self) -> dict[Kind, int]:
        """Queued jobs by kind."""
        counts = dict.fromkeys(KINDS, 0)
        for queue in self._queues.values():
            for work in queue:
                counts[work.kind] += 1
        return counts

    async def submit(
        self, owner: str, kind: Kind, job: Any, cost: int, session: str | None = None
    ) -> Any:
        work = Work(owner, kind, job, cost, session)
        self._queues.setdefault(owner, deque()).append(work)
        self._wakeup.set()
        return await work.future

    def take(self) -> list[Work]:
        """The next iteration's work: round-robin across keys, within the budget."""
        batch: list[Work] = []
        spent, sessions, blocked = 0, set[str | None](), set[str]()
        while True:
            taken = False
            for owner, queue in self._queues.items():
                if owner in blocked or not queue:
                    continue
                work = queue[0]
                fits = not batch or spent + work.cost <= self._budget
                if not fits or (work.session is not None and work.session in sessions):
                    blocked.add(owner)  # the key's later jobs keep their order: none this time
                    continue
                queue.popleft()
                if work.future.done():  # the caller went away (disconnect or timeout)
                    taken = True
                    continue
                batch.append(work)
                spent += work.cost
                sessions.add(work.session)
                taken = True
            if not taken:
                break
        for owner in [o for o, q in self._queues.items() if not q]:
            del self._queues[owner]
        if self._queues:  # the next iteration starts with the next key
            self._queues.move_to_end(next(iter(self._queues)))
        return batch

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queues:
                try:
                    await self._iteration()
                except Exception:  # a bug here must not leave every later request waiting
                    log.exception("scheduler iteration failed; continuing")

    async def _iteration(self) -> None:
        await self._linger_for_stepped()
        batch = self.take()
        for kind in KINDS:
            works = [w for w in batch if w.kind == kind]
            if works:
                await self._run(kind, works)

    async def _linger_for_stepped(self) -> None:
        """Wait (briefly) until every session of the last step pass has its next step queued."""
        deadline = time.monotonic() + self._linger
        while self._stepped - {w.session for q in self._queues.values() for w in q}:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
        self._stepped = set()

    async def _run(self, kind: Kind, works: list[Work]) -> None:
        started = time.monotonic()
        try:
            self._observe(kind, works)
        except Exception:
            log.exception("observing a pass failed")
        try:
            results = await self._execute(kind, [w.job for w in works])
        except Exception as exc:  # delivered to every waiting caller, who maps it to a response
            results = [exc] * len(works)
        if kind == "step":
            self._stepped = {w.session for w in works if w.session is not None}
            self._linger = min(LINGER_SHARE * (time.monotonic() - started), LINGER_MAX_S)
        for work, result in zip(works, results, strict=True):
            if work.future.done():
                continue
            if isinstance(result, Exception):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)
