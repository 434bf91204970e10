"""Continuous batching of the data owner's requests on one decoding thread per served model.

Requests arrive as :class:`~data_owner_client.generate.Job` s from any thread. Each iteration of
the engine's thread opens one server session over every job that arrived since the last (so a
request joins at the next step instead of waiting for the others to finish), then advances every
open session by one token with :meth:`Generator.advance`: the mixtures of all rows in one pass of
the head and adapter, the server steps of all sessions sent at once (the server runs them in one
pass). A job whose client went away is cancelled and its rows leave at the next step.

Sessions are bounded by a semaphore shared by all engines: the PLM owner's server allows each
key only so many. Jobs beyond it wait for a session to finish.
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


class Engine:
    """Decodes the jobs given to :meth:`submit` together, on a thread of its own."""

    def __init__(self, generator: Generator, sessions: threading.Semaphore, name: str) -> None:
        self.generator, self.sessions, self.name = generator, sessions, name
        self.max_rows = generator.served.info.limits.max_batch_size  # rows of one session
        self._inbox: queue.SimpleQueue[tuple[Job, Notify] | None] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._batches: list[Batch] = []
        self._notify: dict[int, Notify] = {}  # id(job) -> its listener
        self._closed = threading.Event()
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
        if len(job.rows) > self.max_rows:
            raise ValueError(
                f"{len(job.rows)} sequences in one request; the model's server takes at most "
                f"{self.max_rows}"
            )
        if self._closed.is_set():
            raise EngineClosed("the service is shutting down")
        self._inbox.put((job, notify))

    @property
    def load(self) -> tuple[int, int]:
        """(jobs waiting for a session, rows decoding), for metrics and tests."""
        return len(self._waiting), sum(len(b.live) for b in self._batches)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._receive()
            self._admit()
            if self._batches:
                self._step()
        for batch in self._batches:
            self.generator.close(batch)
        for job in [job for batch in self._batches for job in batch.jobs] + list(self._waiting):
            self._end(job, EngineClosed("the service is shutting down"))

    def _receive(self) -> None:
        """Take what arrived. With nothing to do, wait for a job, then for the jobs that follow
        it closely (clients of one burst share a session instead of opening one each)."""
        idle = not self._batches
        timeout = IDLE_POLL_S if self._waiting else None
        deadline = None
        while True:
            if idle and deadline is not None:
                timeout = max(0.0, min(GATHER_S, deadline - time.monotonic()))
            try:
                item = self._inbox.get(block=idle, timeout=timeout if idle else None)
            except queue.Empty:
                return
            if item is None:
                return
            job, notify = item
            self._waiting.append(job)
            self._notify[id(job)] = notify
            deadline = deadline or time.monotonic() + GATHER_MAX_S

    def _admit(self) -> None:
        """Open sessions over the waiting jobs (as many rows as one session holds each) while
        the key has sessions to spare."""
        for job in [job for job in self._waiting if job.cancelled]:
            self._waiting.remove(job)
            self._end(job, None)
        while self._waiting and self.sessions.acquire(blocking=False):
            jobs: list[Job] = []
            rows = 0
            while self._waiting and (
                not jobs or rows + len(self._waiting[0].rows) <= self.max_rows
            ):
                jobs.append(self._waiting.popleft())
                rows += len(jobs[-1].rows)
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
                if not batch.live or job.finished:
                    self._end(job, None if job.finished else batch.error)
                elif id(job) in self._notify:
                    self._tell(self._notify[id(job)], job, None)
            if not batch.live:
                self._batches.remove(batch)
                self.sessions.release()

    def _end(self, job: Job, error: Exception | None) -> None:
        notify = self._notify.pop(id(job), None)
        if notify is not None:
            self._tell(notify, job, error)

    def _tell(self, notify: Notify, job: Job, error: Exception | None) -> None:
        try:
            notify(job, error)
        except Exception:  # a listener's fault must not stop the engine
            log.exception("%s: notifying a job failed", self.name)
