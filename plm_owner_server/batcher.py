"""Coalescing: requests that arrive while the model is busy share the next forward pass."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Job, Result]):
    job: Job
    cost: int
    future: asyncio.Future[Result] = field(default_factory=asyncio.Future)


class Coalescer(Generic[Job, Result]):
    """Queues jobs and runs them in batches whose summed cost stays within a budget.

    ``run_batch`` gets the jobs of one batch and returns one result per job. A job costlier than
    the budget runs alone. No time window: a batch is whatever queued while the last one ran.
    """

    def __init__(
        self, run_batch: Callable[[Sequence[Job]], Awaitable[Sequence[Result]]], budget: int
    ) -> None:
        self._run_batch = run_batch
        self._budget = budget
        self._pending: deque[_Pending[Job, Result]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pema-coalescer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, job: Job, cost: int) -> Result:
        pending: _Pending[Job, Result] = _Pending(job, cost)
        self._pending.append(pending)
        self._wakeup.set()
        return await pending.future

    def _take(self) -> list[_Pending[Job, Result]]:
        batch = [self._pending.popleft()]
        total = batch[0].cost
        while self._pending and total + self._pending[0].cost <= self._budget:
            total += self._pending[0].cost
            batch.append(self._pending.popleft())
        # A caller that went away (client disconnect) no longer needs its work done.
        return [p for p in batch if not p.future.done()]

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._take()
                if batch:
                    await self._run(batch)

    async def _run(self, batch: list[_Pending[Job, Result]]) -> None:
        try:
            results = await self._run_batch([p.job for p in batch])
        except Exception as exc:  # delivered to every waiting caller, who maps it to a response
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
