"""Coalescing: concurrent /v1/represent requests share forward passes and get their own answers;
and the Coalescer on its own (budget, FIFO order, errors, cancelled callers)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import httpx
import pytest
import torch
from fastapi import FastAPI

from plm_owner_server.app import create_app
from plm_owner_server.batcher import Coalescer
from plm_owner_server.settings import Settings
from shared.codec import decode_tensor, pack, unpack
from shared.protocol import MSGPACK, RepresentRequest, RepresentResponse
from tests.server.helpers import assert_same_logits

# Different lengths, starts, row counts and logits options; all float32 so answers compare to 1e-5.
REQUESTS = [
    RepresentRequest(sequences=[[5, 9, 17, 33, 8, 41, 60, 12]]),
    RepresentRequest(sequences=[[4, 70, 3]], start=[2], logits="full"),
    RepresentRequest(sequences=[[11, 12, 13, 14, 15], [16, 17]], start=[1, 0], logits=3),
    RepresentRequest(sequences=[[20] * 30], start=[25], logits=5),
    RepresentRequest(sequences=[[7], [8, 9, 10, 11, 12, 13], [14, 15, 16]], logits="full"),
    RepresentRequest(sequences=[[30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]], start=[6]),
    RepresentRequest(sequences=[[90, 91, 92, 93]], start=[3], logits=1),
]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the loop until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def represent(client: httpx.AsyncClient, request: RepresentRequest) -> RepresentResponse:
    response = await client.post(
        "/v1/represent", content=pack(request), headers={"content-type": MSGPACK}
    )
    assert response.status_code == 200, response.text
    return unpack(response.content, RepresentResponse)


def assert_same_answer(got: RepresentResponse, want: RepresentResponse) -> None:
    assert got.offsets == want.offsets
    assert got.fingerprint == want.fingerprint
    torch.testing.assert_close(
        decode_tensor(got.hidden), decode_tensor(want.hidden), rtol=0, atol=1e-5
    )
    assert_same_logits(got.logits, want.logits)


class GatedRunner:
    """Wraps ``runner.represent``: records each pass's rows; the first pass waits for a gate."""

    def __init__(self, represent: Callable[..., list[torch.Tensor]]) -> None:
        self.represent, self.passes, self.gate = represent, [], threading.Event()

    def __call__(self, rows: Sequence[Sequence[int]], *args: Any) -> list[torch.Tensor]:
        self.passes.append(len(rows))
        if len(self.passes) == 1:
            assert self.gate.wait(10), "the test never opened the gate"
        return self.represent(rows, *args)


class Run(NamedTuple):
    together: list[RepresentResponse]  # answers to REQUESTS sent concurrently
    alone: list[RepresentResponse]  # answers to REQUESTS sent one at a time
    queued: list[RepresentRequest]  # REQUESTS[1:] in the order they reached the coalescer


async def post_behind_a_slow_pass(app: FastAPI, gated: GatedRunner) -> Run:
    """All of REQUESTS but the first queue up while the first one's pass is held; then each
    request again, alone. Runs the app's lifespan itself: ASGITransport does not."""
    async with app.router.lifespan_context(app):
        coalescer = app.state.pema.representer.coalescer
        submitted, submit = [], coalescer.submit

        async def counting_submit(job: RepresentRequest, cost: int) -> RepresentResponse:
            submitted.append(job)
            return await submit(job, cost)

        coalescer.submit = counting_submit
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pema") as client:
            first = asyncio.create_task(represent(client, REQUESTS[0]))
            await until(lambda: len(gated.passes) == 1)  # the model is busy with the first
            rest = [asyncio.create_task(represent(client, r)) for r in REQUESTS[1:]]
            await until(lambda: len(submitted) == len(REQUESTS))  # all queued behind it
            gated.gate.set()
            together = await asyncio.gather(first, *rest)
            alone = [await represent(client, r) for r in REQUESTS]
    return Run(together, alone, submitted[1 : len(REQUESTS)])


def test_concurrent_requests_share_a_pass_and_get_their_own_answers(runner, monkeypatch):
    """Requests queued behind a busy model share one pass; each answer equals the request alone."""
    gated = GatedRunner(runner.represent)
    monkeypatch.setattr(runner, "represent", gated)
    app = create_app(Settings(), runner=runner)
    run = asyncio.run(post_behind_a_slow_pass(app, gated))
    rows = [len(r.sequences) for r in REQUESTS]
    assert gated.passes[:2] == [rows[0], sum(rows[1:])]
    assert len(gated.passes) == 2 + len(REQUESTS)  # then one pass per request alone
    # Passes of 1 request, then len(REQUESTS) - 1, then 1 each alone.
    registry = app.state.pema.metrics.registry
    assert registry.get_sample_value("pema_batch_requests_count") == 2 + len(REQUESTS)
    assert registry.get_sample_value("pema_batch_requests_sum") == 2 * len(REQUESTS)
    for got, want in zip(run.together, run.alone, strict=True):
        assert_same_answer(got, want)


def test_coalesced_batch_is_split_by_the_token_budget(runner, monkeypatch):
    """With a small max_batch_tokens, queued requests go in several FIFO passes within it."""
    gated = GatedRunner(runner.represent)
    monkeypatch.setattr(runner, "represent", gated)
    budget = 32
    app = create_app(Settings(max_batch_tokens=budget), runner=runner)
    run = asyncio.run(post_behind_a_slow_pass(app, gated))
    batches = greedy_batches(run.queued, budget)
    assert len(batches) > 1 and any(len(batch) > 1 for batch in batches)
    rows_per_pass = [sum(len(r.sequences) for r in batch) for batch in batches]
    assert gated.passes[1 : 1 + len(batches)] == rows_per_pass
    assert len(gated.passes) == 1 + len(batches) + len(REQUESTS)
    for got, want in zip(run.together, run.alone, strict=True):
        assert_same_answer(got, want)


def cost(request: RepresentRequest) -> int:
    return sum(map(len, request.sequences))


def greedy_batches(requests: list[RepresentRequest], budget: int) -> list[list[RepresentRequest]]:
    """FIFO batches within ``budget`` (a request over it alone), as the coalescer forms them."""
    batches: list[list[RepresentRequest]] = []
    for request in requests:
        if batches and sum(map(cost, batches[-1])) + cost(request) <= budget:
            batches[-1].append(request)
        else:
            batches.append([request])
    return batches


# The Coalescer on its own.


class Batches:
    """A ``run_batch`` that records its batches, holds the first until released, and fails any
    batch holding the job "bad"."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.release = asyncio.Event()

    async def __call__(self, jobs: Sequence[str]) -> list[str]:
        self.seen.append(list(jobs))
        if len(self.seen) == 1:
            await self.release.wait()
        if "bad" in jobs:
            raise RuntimeError("the model failed")
        return [job.upper() for job in jobs]


async def with_coalescer(
    budget: int, scenario: Callable[[Coalescer[str, str], Batches], Awaitable[None]]
) -> Batches:
    """Run ``scenario`` against a started coalescer, then stop it."""
    batches = Batches()
    coalescer: Coalescer[str, str] = Coalescer(batches, budget)
    coalescer.start()
    try:
        await scenario(coalescer, batches)
    finally:
        await coalescer.stop()
    return batches


async def queue_behind_first(
    coalescer: Coalescer[str, str], batches: Batches, jobs: list[tuple[str, int]]
) -> list[asyncio.Task[str]]:
    """Submit "first"; while its batch is held, queue ``jobs`` (name, cost) in order."""
    tasks = [asyncio.create_task(coalescer.submit("first", 1))]
    await until(lambda: len(batches.seen) == 1)
    tasks += [asyncio.create_task(coalescer.submit(job, cost)) for job, cost in jobs]
    await asyncio.sleep(0)  # every task runs up to its await: all jobs are queued
    return tasks


def test_coalescer_respects_the_budget_in_fifo_order():
    """Batches keep submission order, stay within the budget, and a costlier job runs alone."""
    jobs = [("a", 4), ("b", 4), ("c", 4), ("huge", 20), ("e", 3), ("f", 3), ("g", 3), ("h", 3)]

    async def scenario(coalescer: Coalescer[str, str], batches: Batches) -> None:
        tasks = await queue_behind_first(coalescer, batches, jobs)
        batches.release.set()
        assert await asyncio.gather(*tasks) == ["FIRST", *(job.upper() for job, _ in jobs)]

    seen = asyncio.run(with_coalescer(10, scenario)).seen
    assert seen == [["first"], ["a", "b"], ["c"], ["huge"], ["e", "f", "g"], ["h"]]


def test_coalescer_error_reaches_every_caller_of_its_batch_only():
    """An exception in run_batch fails that batch's callers; later jobs are still served."""

    async def scenario(coalescer: Coalescer[str, str], batches: Batches) -> None:
        tasks = await queue_behind_first(coalescer, batches, [("x", 1), ("bad", 1), ("y", 1)])
        batches.release.set()
        first, *failed = await asyncio.gather(*tasks, return_exceptions=True)
        assert first == "FIRST"
        assert len(failed) == 3
        assert all(isinstance(e, RuntimeError) and "model failed" in str(e) for e in failed)
        assert await coalescer.submit("later", 1) == "LATER"

    seen = asyncio.run(with_coalescer(10, scenario)).seen
    assert seen == [["first"], ["x", "bad", "y"], ["later"]]


def test_coalescer_drops_a_caller_cancelled_while_queued():
    """A caller that went away before its batch ran is left out of it; the others are served."""

    async def scenario(coalescer: Coalescer[str, str], batches: Batches) -> None:
        first, a, gone, b = await queue_behind_first(
            coalescer, batches, [("a", 1), ("gone", 1), ("b", 1)]
        )
        gone.cancel()
        batches.release.set()
        assert await asyncio.gather(first, a, b) == ["FIRST", "A", "B"]
        assert gone.cancelled()

    seen = asyncio.run(with_coalescer(10, scenario)).seen
    assert seen == [["first"], ["a", "b"]]


def test_coalescer_survives_a_caller_cancelled_while_its_batch_runs():
    """Cancelling a caller mid-batch neither breaks its batch-mates nor the coalescer."""

    async def scenario(coalescer: Coalescer[str, str], batches: Batches) -> None:
        first = asyncio.create_task(coalescer.submit("first", 1))
        mate = asyncio.create_task(coalescer.submit("mate", 1))
        await until(lambda: len(batches.seen) == 1)
        first.cancel()
        batches.release.set()
        assert await mate == "MATE"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await coalescer.submit("later", 1) == "LATER"

    seen = asyncio.run(with_coalescer(10, scenario)).seen
    assert seen == [["first", "mate"], ["later"]]
