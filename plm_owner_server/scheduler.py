"""One scheduler for all model work of all API keys.

Requests queue per key, in two lanes: session steps, and prefills (session openings and
``/v1/represent``). Each iteration takes work round-robin across keys (one job per key per round,
starting with a different key each iteration) and runs it grouped by kind: every session step of
every key in one pass, then the openings' pass, then the represents'. Steps run first, so a
decoding client never waits behind a prefill of the same iteration, and a session steps at most
once per iteration.

Prefills are chunked (as vLLM's chunked prefill): an iteration grants its prefills at most a token
budget, round-robin across keys like the rest; a prefill is taken whole if it fits in what is left,
and the first prefill of an iteration is granted the whole budget if it does not. A pass may
advance a job by its grant and answer :class:`Partial`: the job goes back to the head of its key's
queue and goes on in a later iteration, so a long prefill of one key takes turns with other keys'
prefills. While sessions are decoding (a session not closed stepped within the last second) the
budget is the chunk size, so their steps wait behind at most one chunk; otherwise it is the whole
batch budget, since nobody is waiting and a few large passes are cheaper than many small ones.
Work whose caller went away is dropped.

An iteration is whatever queued while the last one ran, with one exception: the sessions of the
last step pass are given a moment (a quarter of that pass's time, at most ``LINGER_MAX_S``) to send
their next step, because their clients answer a few milliseconds apart. Without it, decoding
clients that share one pass drift into several ragged passes, each reading all weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["step", "open", "represent"]
KINDS: tuple[Kind, ...] = ("step", "open", "represent")  # the order passes run in

log = logging.getLogger(__name__)
LINGER_SHARE = 0.25  # of the last step pass's time, waited for its sessions' next steps
LINGER_MAX_S = 0.05
DECODING_S = 1.0  # a session not closed counts as decoding this long after its last step


@dataclass(frozen=True)
class Partial:
    """A pass's answer for a job it advanced but did not finish: ``cost`` tokens remain."""

    cost: int


# Runs one kind's jobs on the model, each within its grant of tokens; per job its result, the
# exception to raise, or Partial.
Execute = Callable[[Kind, Sequence[Any], Sequence[int]], Awaitable[Sequence[Any]]]


@dataclass
class Work:
    owner: str
    kind: Kind
    job: Any
    cost: int  # padded tokens the job adds to a pass (what remains of it, once begun)
    session: str | None = None  # a step's session: one step per session per iteration
    future: asyncio.Future[Any] = field(default_factory=asyncio.Future)
    grant: int = 0  # tokens it may use in the pass it is taken for

    @property
    def gone(self) -> bool:
        """Its caller went away (disconnect or timeout), or it was answered."""
        return self.future.done()


Lane = OrderedDict[str, deque[Work]]  # queued work per key, the next key to serve first


class Scheduler:
    def __init__(
        self,
        execute: Execute,
        budget: int,
        observe: Callable[[Kind, Sequence[Work]], None] = lambda kind, works: None,
        chunk: int | None = None,
    ) -> None:
        self._execute, self._budget, self._observe = execute, budget, observe
        self._chunk = min(chunk or budget, budget)  # prefill tokens per iteration while decoding
        self._steps: Lane = OrderedDict()
        self._prefills: Lane = OrderedDict()
        self._stepped: set[str] = set()  # the sessions of the last step pass
        self._decoding: dict[str, float] = {}  # sessions not closed: when they last stepped
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
        for work in self._all():  # nobody will run these any more
            if not work.gone:
                work.future.set_exception(RuntimeError("the server is shutting down"))
        self._steps.clear()
        self._prefills.clear()

    def _all(self) -> Iterable[Work]:
        for lane in (self._steps, self._prefills):
            for queue in lane.values():
                yield from queue

    def depth(self) -> dict[Kind, int]:
        """Queued jobs by kind (an unfinished prefill is queued between its passes)."""
        counts = dict.fromkeys(KINDS, 0)
        for work in self._all():
            counts[work.kind] += 1
        return counts

    async def submit(
        self, owner: str, kind: Kind, job: Any, cost: int, session: str | None = None
    ) -> Any:
        work = Work(owner, kind, job, cost, session)
        lane = self._steps if kind == "step" else self._prefills
        lane.setdefault(owner, deque()).append(work)
        self._wakeup.set()
        return await work.future

    def take(self, decoding: bool = False) -> list[Work]:
        """The next iteration's work: steps round-robin across keys within the budget, then
        prefills within the chunk size if sessions are ``decoding`` or step now, else within
        the budget."""
        steps = _round_robin(self._steps, self._budget, split=False)
        budget = self._chunk if decoding or steps else self._budget
        return steps + _round_robin(self._prefills, budget, split=True)

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while any(self._steps.values()) or any(self._prefills.values()):
                try:
                    await self._iteration()
                except Exception:  # a bug here must not leave every later request waiting
                    log.exception("scheduler iteration failed; continuing")

    async def _iteration(self) -> None:
        await self._linger_for_stepped()
        batch = self.take(self._sessions_decoding())
        for kind in KINDS:
            works = [w for w in batch if w.kind == kind]
            if works:
                await self._run(kind, works)

    def closed(self, session: str) -> None:
        """The session ended: it no longer counts as decoding."""
        self._decoding.pop(session, None)

    def _sessions_decoding(self) -> bool:
        """Whether a session not closed stepped within ``DECODING_S``."""
        now = time.monotonic()
        for session in [s for s, t in self._decoding.items() if now - t >= DECODING_S]:
            del self._decoding[session]
        return bool(self._decoding)

    async def _linger_for_stepped(self) -> None:
        """Wait (briefly) until every session of the last step pass has its next step queued."""
        deadline = time.monotonic() + self._linger
        while self._stepped - {w.session for q in self._steps.values() for w in q}:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
        self._stepped = set()

    async def _run(self, kind: Kind, works: list[Work]) -> None:
        works = [w for w in works if not w.gone]  # callers gone while earlier passes ran
        if not works:
            return
        started = time.monotonic()
        try:
            self._observe(kind, works)
        except Exception:
            log.exception("observing a pass failed")
        try:
            results = await self._execute(kind, [w.job for w in works], [w.grant for w in works])
        except Exception as exc:  # delivered to every waiting caller, who maps it to a response
            results = [exc] * len(works)
        if kind == "step":
            self._stepped = {w.session for w in works if w.session is not None}
            ended = time.monotonic()
            for work, result in zip(works, results, strict=True):  # a failed step is no decoding
                if work.session is not None and not isinstance(result, Exception):
                    self._decoding[work.session] = ended
            self._linger = min(LINGER_SHARE * (ended - started), LINGER_MAX_S)
        # Last first: a key's unfinished prefills go back to the head of its queue in order.
        for work, result in reversed(list(zip(works, results, strict=True))):
            if work.gone:
                continue
            if isinstance(result, Partial):  # its key's next prefill, in a later iteration
                work.cost = result.cost
                self._prefills.setdefault(work.owner, deque()).appendleft(work)
            elif isinstance(result, Exception):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)


def _round_robin(lane: Lane, budget: int, split: bool) -> list[Work]:
    """Work of ``lane`` round-robin across keys (each key's jobs in their order) within
    ``budget``; a job over what is left waits, unless it would be the first: then it runs
    alone, whole or (``split``) granted the budget. The next call starts with the next key."""
    batch: list[Work] = []
    spent, sessions, blocked = 0, set[str | None](), set[str]()
    while True:
        progressed = False
        for owner, queue in lane.items():
            if owner in blocked or not queue:
                continue
            work = queue[0]
            if work.gone:
                queue.popleft()
                progressed = True
                continue
            fits = not batch or spent + work.cost <= budget
            if not fits or (work.session is not None and work.session in sessions):
                blocked.add(owner)  # the key's later jobs keep their order: none this time
                continue
            queue.popleft()
            work.grant = min(work.cost, budget - spent) if split else work.cost
            batch.append(work)
            spent += work.grant
            sessions.add(work.session)
            progressed = True
        if not progressed:
            break
    if lane:  # the next iteration starts with the next key
        lane.move_to_end(next(iter(lane)))
    for owner in [o for o, q in lane.items() if not q]:
        del lane[owner]
    return batch
