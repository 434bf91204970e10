"""Continuous batching of the data owner's requests on one decoding thread per served model.

Requests arrive as :class:`~data_owner_client.generate.Job` s from any thread. Each iteration of
the engine's thread opens one server session over every job that arrived since the last (so a
request joins at the next step instead of waiting for the others to finish), then advances every
open session by one token with :meth:`Generator.advance`: the mixtures of all rows in one pass of
the head and adapter, the server steps of all sessions sent at once (the server runs them in one
pass). A job whose client went away is cancelled and its rows leave at the next step.

Sessions are a :class:`SessionPool` shared by all engines, handed out in the order engines ask:
the PLM owner's server allows each key only so many. Jobs beyond it wait for a session to finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from data_owner_client.generate import Batch, Generator, Job

log = logging.getLogger(__name__)
# Called on the engine's thread after each step of a job and once more when it ends; the error
# is why it ended early (None while it runs and when it finished).
Notify = Callable[[Job, Exception | None], None]
IDLE_POLL_S = 0.05  # how often a job waiting for a session looks for one
GATHER_S = 0.005  # an idle engine waits this long after a job for the next of its burst
GATHER_MAX_S = 0.03  # and no longer than this in all


class EngineClosed(RuntimeError):
    """The engine stopped before the job ended."""


class SessionPool:
    """The PLM server sessions all engines may hold at once, handed out first come, first served:
    an engine that asked and had to wait gets the next free one before anyone else."""

    def __init__(self, size: int) -> None:
        self._free, self._waiting = size, deque[object]()
        self._lock = threading.Lock()

    def acquire(self, engine: object) -> bool:
        """A session for ``engine`` if one is free and no engine asked before it; else it joins
        the queue (once) and asks again later."""
        with self._lock:
            first = not self._waiting or self._waiting[0] is engine
            if self._free and first:
                if self._waiting:
                    self._waiting.popleft()
                self._free -= 1
                return True
            if engine not in self._waiting:
                self._waiting.append(engine)
            return False

    def withdraw(self, engine: object) -> None:
        """``engine`` no longer waits."""
        with self._lock:
            if engine in self._waiting:
                self._waiting.remove(engine)

    def release(self) -> None:
        with self._lock:
            self._free += 1


class Engine:
    """Decodes the jobs given to :meth:`submit` together, on a thread of its own."""

    def __init__(self, generator: Generator, sessions: SessionPool, name: str) -> None:
        self.generator, self.sessions, self.name = generator, sessions, name
        limits = generator.served.info.limits
        # What one session holds: the server's bounds on one request.
        self.max_rows, self.max_tokens = limits.max_batch_size, limits.max_request_tokens
        self._inbox: queue.SimpleQueue[tuple[Job, Notify] | None] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._batches: list[Batch] = []
        self._notify: dict[Job, Notify] = {}
        self._closed = threading.Event()
        self._lock = threading.Lock()  # submit against the thread's last drain
        self._thread = threading.Thread(target=self._run, name=f"pema-engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop after the current step; unfinished jobs end with :class:`EngineClosed`."""
        self._closed.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job, notify: Notify) -> None:
        """Decode ``job`` with the others; ``notify`` hears of each of its steps."""
        rows, tokens = len(job.rows), _tokens(job)
        if rows > self.max_rows or tokens > self.max_tokens:
            raise ValueError(
                f"{rows} sequences of {tokens} tokens in all (prompts and new tokens) in one "
                f"request; the model's server takes at most {self.max_rows} sequences of "
                f"{self.max_tokens} tokens at once: split it, or ask for fewer tokens"
            )
        with self._lock:
            if self._closed.is_set():
                raise EngineClosed("the service is shutting down")
            self._inbox.put((job, notify))

    @property
    def load(self) -> tuple[int, int]:
        """(jobs waiting for a session, rows decoding), read from any thread for metrics."""
        return len(self._waiting), sum(len(batch.live) for batch in list(self._batches))

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._receive()
                self._admit()
                if self._batches:
                    self._step()
        except BaseException:
            log.exception("%s: the engine stopped", self.name)
            raise
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        """End every job still here or on its way (none can arrive after this)."""
        with self._lock:
            self._closed.set()
        while not self._inbox.empty():
            if (item := self._get(block=False)) is not None:
                self._keep(*item)
        for batch in self._batches:
            self.generator.close(batch)
        jobs = [job for batch in self._batches for job in batch.jobs] + list(self._waiting)
        for job in jobs:
            self._end(job, EngineClosed("the service is shutting down"))
        self.sessions.withdraw(self)
        self.generator.shutdown()

    def _get(self, block: bool, timeout: float | None = None) -> tuple[Job, Notify] | None:
        try:
            return self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return None

    def _keep(self, job: Job, notify: Notify) -> None:
        self._waiting.append(job)
        self._notify[job] = notify

    def _receive(self) -> None:
        """Take what arrived. With nothing to do, wait for a job, then for the jobs that follow
        it closely (clients of one burst share a session instead of opening one each)."""
        if self._batches:  # busy: take what is there and go on
            while (item := self._get(block=False)) is not None:
                self._keep(*item)
            return
        item = self._get(block=True, timeout=IDLE_POLL_S if self._waiting else None)
        deadline = time.monotonic() + GATHER_MAX_S
        while item is not None:
            self._keep(*item)
            item = self._get(
                block=True, timeout=max(0.0, min(GATHER_S, deadline - time.monotonic()))
            )

    def _admit(self) -> None:
        """Open sessions over the waiting jobs (as many as one session holds each) while the
        pool has sessions for this engine."""
        for job in [job for job in self._waiting if job.cancelled]:
            self._waiting.remove(job)
            for row in job.rows:
                row.finish_reason = "cancelled"
            self._end(job, None)
        if not self._waiting:
            self.sessions.withdraw(self)
        while self._waiting and self.sessions.acquire(self):
            jobs = [self._waiting.popleft()]
            rows, tokens = len(jobs[0].rows), _tokens(jobs[0])
            while self._waiting and (
                rows + len(self._waiting[0].rows) <= self.max_rows
                and tokens + _tokens(self._waiting[0]) <= self.max_tokens
            ):
                jobs.append(self._waiting.popleft())
                rows, tokens = rows + len(jobs[-1].rows), tokens + _tokens(jobs[-1])
            try:
                self._batches.append(self.generator.open(jobs))
            except Exception as exc:  # the server refused or is away: these jobs fail
                self.sessions.release()
                log.warning("%s: could not open a session: %s", self.name, exc)
                for job in jobs:
                    self._end(job, exc)

    def _step(self) -> None:
        try:
            self.generator.advance(self._batches)
        except Exception as exc:  # a fault of the local step: every batch fails with it
            log.exception("%s: decoding step failed", self.name)
            for batch in self._batches:
                batch.error, batch.live = exc, []
                self.generator.close(batch)
        for batch in list(self._batches):
            for job in batch.jobs:
                if job.error is not None or not batch.live or job.finished:
                    self._end(job, job.error or (None if job.finished else batch.error))
                elif job in self._notify:
                    self._tell(self._notify[job], job, None)
            if not batch.live:
                self._batches.remove(batch)
                self.sessions.release()

    def _end(self, job: Job, error: Exception | None) -> None:
        notify = self._notify.pop(job, None)
        if notify is not None:
            self._tell(notify, job, error)

    def _tell(self, notify: Notify, job: Job, error: Exception | None) -> None:
        try:
            notify(job, error)
        except Exception:  # a listener's fault must not stop the engine
            log.exception("%s: notifying a job failed", self.name)


def _tokens(job: Job) -> int:
    """The most tokens the job's rows send in one request: prompts and every new token (what a
    re-opened session holds)."""
    return sum(len(row.prompt) + row.budget for row in job.rows)
