"""The scheduler: concurrent /v1/represent requests share forward passes and get their own
answers; and the Scheduler on its own (budget, FIFO order per key, round-robin across keys, one
step per session, errors, cancelled callers)."""

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
from plm_owner_server.scheduler import Kind, Partial, Scheduler
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
    queued: list[RepresentRequest]  # REQUESTS[1:] in the order they reached the scheduler


async def post_behind_a_slow_pass(app: FastAPI, gated: GatedRunner) -> Run:
    """All of REQUESTS but the first queue up while the first one's pass is held; then each
    request again, alone. Runs the app's lifespan itself: ASGITransport does not."""
    async with app.router.lifespan_context(app):
        scheduler = app.state.pema.work.scheduler
        submitted, submit = [], scheduler.submit

        async def counting_submit(owner: str, kind: Kind, job: Any, *args: Any) -> Any:
            submitted.append(job.request)
            return await submit(owner, kind, job, *args)

        scheduler.submit = counting_submit
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
    registry, kind = app.state.pema.metrics.registry, {"kind": "represent"}
    assert registry.get_sample_value("pema_pass_requests_count", kind) == 2 + len(REQUESTS)
    assert registry.get_sample_value("pema_pass_requests_sum", kind) == 2 * len(REQUESTS)
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
    """FIFO batches within ``budget`` (a request over it alone), as the scheduler forms them
    for one key."""
    batches: list[list[RepresentRequest]] = []
    for request in requests:
        if batches and sum(map(cost, batches[-1])) + cost(request) <= budget:
            batches[-1].append(request)
        else:
            batches.append([request])
    return batches


# The Scheduler on its own.


class Passes:
    """An ``execute`` that records its passes as job names, holds the first until released,
    fails a pass holding the job "bad" and answers the job "oops" with an exception of its own."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.release = asyncio.Event()

    async def __call__(
        self, kind: Kind, jobs: Sequence[str], grants: Sequence[int]
    ) -> list[str | Exception]:
        self.seen.append(list(jobs))
        if len(self.seen) == 1:
            await self.release.wait()
        if "bad" in jobs:
            raise RuntimeError("the model failed")
        return [ValueError("oops") if job == "oops" else job.upper() for job in jobs]


async def with_scheduler(
    budget: int, scenario: Callable[[Scheduler, Passes], Awaitable[None]]
) -> Passes:
    """Run ``scenario`` against a started scheduler, then stop it."""
    passes = Passes()
    scheduler = Scheduler(passes, budget)
    scheduler.start()
    try:
        await scenario(scheduler, passes)
    finally:
        await scheduler.stop()
    return passes


Job = tuple[str, str, int]  # key, name, cost


async def queue_behind_first(
    scheduler: Scheduler, passes: Passes, jobs: list[Job], kind: Kind = "represent"
) -> list[asyncio.Task[str]]:
    """Submit "first"; while its pass is held, queue ``jobs`` in order."""
    tasks = [asyncio.create_task(scheduler.submit("k0", kind, "first", 1))]
    await until(lambda: len(passes.seen) == 1)
    tasks += [
        asyncio.create_task(scheduler.submit(key, kind, name, cost)) for key, name, cost in jobs
    ]
    await asyncio.sleep(0)  # every task runs up to its await: all jobs are queued
    return tasks


def test_one_keys_jobs_keep_their_order_within_the_budget():
    """One key's passes keep submission order, stay within the budget; a costlier job runs alone."""
    names = [("a", 4), ("b", 4), ("c", 4), ("huge", 20), ("e", 3), ("f", 3), ("g", 3), ("h", 3)]
    jobs = [("k", name, cost) for name, cost in names]

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        tasks = await queue_behind_first(scheduler, passes, jobs)
        passes.release.set()
        assert await asyncio.gather(*tasks) == ["FIRST", *(name.upper() for name, _ in names)]

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    assert seen == [["first"], ["a", "b"], ["c"], ["huge"], ["e", "f", "g"], ["h"]]


def test_keys_are_served_round_robin():
    """A key with a long queue does not starve another: each pass takes one job per key in turn,
    and the next iteration starts with another key."""
    jobs = [("big", f"b{i}", 4) for i in range(6)] + [("small", "s0", 1), ("small", "s1", 1)]

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        tasks = await queue_behind_first(scheduler, passes, jobs)
        passes.release.set()
        await asyncio.gather(*tasks)

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    # Budget 10: b0 s0 b1 (9), then s1 would fit but b2 does not: the big key is blocked.
    assert seen[1] == ["b0", "s0", "b1", "s1"]
    assert seen[2:] == [["b2", "b3"], ["b4", "b5"]]


def test_a_session_steps_once_per_pass():
    """Two steps of one session never share a pass; other sessions' steps join the first."""

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        first = asyncio.create_task(scheduler.submit("k", "step", "first", 1, "s"))
        await until(lambda: len(passes.seen) == 1)
        tasks = [
            asyncio.create_task(scheduler.submit(key, "step", name, 1, session))
            for key, name, session in [("k", "a1", "a"), ("k", "a2", "a"), ("j", "b1", "b")]
        ]
        await asyncio.sleep(0)
        passes.release.set()
        assert await asyncio.gather(first, *tasks) == ["FIRST", "A1", "A2", "B1"]

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    assert seen == [["first"], ["a1", "b1"], ["a2"]]


def test_a_pass_error_reaches_its_callers_only():
    """An exception in a pass fails that pass's callers; a per-job exception fails its caller
    only; later jobs are still served."""

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        jobs = [("k", "x", 1), ("k", "bad", 1), ("k", "y", 1)]
        tasks = await queue_behind_first(scheduler, passes, jobs)
        passes.release.set()
        first, *failed = await asyncio.gather(*tasks, return_exceptions=True)
        assert first == "FIRST"
        assert len(failed) == 3
        assert all(isinstance(e, RuntimeError) and "model failed" in str(e) for e in failed)
        ok, oops = await asyncio.gather(
            scheduler.submit("k", "open", "ok", 1),
            scheduler.submit("j", "open", "oops", 1),
            return_exceptions=True,
        )
        assert ok == "OK" and isinstance(oops, ValueError)

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    assert seen == [["first"], ["x", "bad", "y"], ["ok", "oops"]]


def test_passes_run_by_kind_steps_first():
    """One iteration's work runs as one pass per kind: steps, then openings, then represents."""

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        first = asyncio.create_task(scheduler.submit("k", "step", "first", 1, "s"))
        await until(lambda: len(passes.seen) == 1)
        tasks = [
            asyncio.create_task(scheduler.submit(key, kind, name, 1, session))
            for key, kind, name, session in [
                ("a", "represent", "r1", None),
                ("b", "open", "o1", None),
                ("c", "step", "t1", "x"),
                ("a", "represent", "r2", None),
                ("b", "step", "t2", "y"),
            ]
        ]
        await asyncio.sleep(0)
        passes.release.set()
        await asyncio.gather(first, *tasks)

    seen = asyncio.run(with_scheduler(100, scenario)).seen
    assert seen == [["first"], ["t1", "t2"], ["o1"], ["r1", "r2"]]


def test_a_caller_cancelled_while_queued_is_dropped():
    """A caller that went away before its pass ran is left out of it; the others are served."""

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        jobs = [("k", "a", 1), ("k", "gone", 1), ("k", "b", 1)]
        first, a, gone, b = await queue_behind_first(scheduler, passes, jobs)
        gone.cancel()
        passes.release.set()
        assert await asyncio.gather(first, a, b) == ["FIRST", "A", "B"]
        assert gone.cancelled()

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    assert seen == [["first"], ["a", "b"]]


def test_a_caller_cancelled_while_its_pass_runs_harms_nobody():
    """Cancelling a caller mid-pass neither breaks its pass-mates nor the scheduler."""

    async def scenario(scheduler: Scheduler, passes: Passes) -> None:
        first = asyncio.create_task(scheduler.submit("k", "represent", "first", 1))
        mate = asyncio.create_task(scheduler.submit("j", "represent", "mate", 1))
        await until(lambda: len(passes.seen) == 1)
        first.cancel()
        passes.release.set()
        assert await mate == "MATE"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await scheduler.submit("k", "represent", "later", 1) == "LATER"

    seen = asyncio.run(with_scheduler(10, scenario)).seen
    assert seen == [["first", "mate"], ["later"]]


def test_sessions_of_the_last_step_pass_get_a_moment_to_join_the_next():
    """Two clients decoding together answer a few ms apart: the scheduler waits briefly for the
    late one, so their steps keep sharing passes instead of drifting apart."""
    seen: list[list[str]] = []

    async def execute(kind: Kind, jobs: Sequence[str], grants: Sequence[int]) -> list[str]:
        seen.append(list(jobs))
        await asyncio.sleep(0.08)  # a step pass of 80 ms: the linger is 20 ms
        return list(jobs)

    async def client(scheduler: Scheduler, session: str, delay: float) -> None:
        for step in range(3):
            await scheduler.submit(session, "step", f"{session}{step}", 1, session)
            await asyncio.sleep(delay)

    async def scenario() -> None:
        scheduler = Scheduler(execute, budget=10)
        scheduler.start()
        try:
            await asyncio.gather(client(scheduler, "a", 0), client(scheduler, "b", 0.008))
        finally:
            await scheduler.stop()

    asyncio.run(scenario())
    assert seen == [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]


# Chunked prefill.


class Chunked:
    """An ``execute`` whose prefill jobs ("name:tokens") take as many passes as their grants
    need (each answering Partial with what remains); records passes as (job, grant) pairs and
    holds the first until released."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[str, int]]] = []
        self.left: dict[str, int] = {}
        self.release = asyncio.Event()

    async def __call__(
        self, kind: Kind, jobs: Sequence[str], grants: Sequence[int]
    ) -> list[str | Partial]:
        self.seen.append(list(zip(jobs, grants, strict=True)))
        if len(self.seen) == 1:
            await self.release.wait()
        out: list[str | Partial] = []
        for job, grant in zip(jobs, grants, strict=True):
            name, _, tokens = job.partition(":")
            left = self.left.setdefault(job, int(tokens or 1)) - grant
            self.left[job] = left
            out.append(Partial(left) if left > 0 else name.upper())
        return out


async def chunked_scheduler(
    budget: int, chunk: int | None, scenario: Callable[[Scheduler, Chunked], Awaitable[None]]
) -> list[list[tuple[str, int]]]:
    passes = Chunked()
    scheduler = Scheduler(passes, budget, chunk=chunk)
    scheduler.start()
    try:
        await scenario(scheduler, passes)
    finally:
        await scheduler.stop()
    return passes.seen


def test_a_prefill_over_the_budget_runs_in_chunks_taking_turns_with_other_keys():
    """With nobody decoding, prefills get the whole budget: one over it runs in passes of the
    budget, back at the head of its key's queue in between, so other keys' prefills take turns
    with it (a job joins a pass whole if it fits in what is left)."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        first = asyncio.create_task(scheduler.submit("k", "represent", "first", 1))
        await until(lambda: len(passes.seen) == 1)
        jobs = [("a", "big:25", 25), ("b", "small:4", 4), ("b", "fits:5", 5), ("a", "next:1", 1)]
        tasks = [asyncio.create_task(scheduler.submit(k, "open", n, c)) for k, n, c in jobs]
        await asyncio.sleep(0)
        passes.release.set()
        assert await asyncio.gather(first, *tasks) == ["FIRST", "BIG", "SMALL", "FITS", "NEXT"]

    seen = asyncio.run(chunked_scheduler(10, None, scenario))
    assert seen[1:] == [
        [("big:25", 10)],  # over the budget: the first prefill takes it all; small waits
        [("small:4", 4), ("fits:5", 5)],  # key b's turn; big (15) does not fit in 6
        [("big:25", 10)],  # key a's turn: its next job waits behind big
        [("big:25", 5), ("next:1", 1)],
    ]


def test_three_keys_long_prefills_take_turns():
    """Each key's turn comes round: no key's unfinished prefill waits for two others'."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        first = asyncio.create_task(scheduler.submit("k", "represent", "first", 1))
        await until(lambda: len(passes.seen) == 1)
        jobs = [(key, f"{key}:30", 30) for key in "abc"]
        tasks = [asyncio.create_task(scheduler.submit(k, "open", n, c)) for k, n, c in jobs]
        await asyncio.sleep(0)
        passes.release.set()
        await asyncio.gather(first, *tasks)

    seen = asyncio.run(chunked_scheduler(10, None, scenario))
    assert [name for ((name, _),) in seen[1:]] == ["a:30", "b:30", "c:30"] * 3


def test_while_sessions_decode_prefills_get_a_chunk_per_step_pass():
    """A session stepping meanwhile: each iteration runs its step, then one chunk of the long
    opening; the step never waits behind more than one chunk."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        first = asyncio.create_task(scheduler.submit("k", "represent", "first", 1))
        await until(lambda: len(passes.seen) == 1)
        opening = asyncio.create_task(scheduler.submit("a", "open", "long:12", 12))

        async def decode() -> None:
            for step in range(4):
                await scheduler.submit("b", "step", f"s{step}", 1, "sb")

        steps = asyncio.create_task(decode())
        await asyncio.sleep(0)
        passes.release.set()
        await asyncio.gather(first, opening, steps)

    seen = asyncio.run(chunked_scheduler(100, 4, scenario))
    assert seen[1:7] == [
        [("s0", 1)],
        [("long:12", 4)],
        [("s1", 1)],
        [("long:12", 4)],
        [("s2", 1)],
        [("long:12", 4)],
    ]
    assert seen[7:] == [[("s3", 1)]]


def test_sessions_count_as_decoding_for_a_second_after_a_step():
    """A prefill that starts just after a step pass, with no step queued, is chunked too (the
    session is still open): its next step would otherwise wait behind all of it."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        passes.release.set()
        await scheduler.submit("b", "step", "s0", 1, "sb")
        assert await scheduler.submit("a", "open", "long:12", 12) == "LONG"

    seen = asyncio.run(chunked_scheduler(100, 4, scenario))
    assert seen == [[("s0", 1)], [("long:12", 4)], [("long:12", 4)], [("long:12", 4)]]


def test_a_closed_session_no_longer_counts_as_decoding():
    """Once the session that stepped is closed, a prefill runs whole again."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        passes.release.set()
        await scheduler.submit("b", "step", "s0", 1, "sb")
        scheduler.closed("sb")
        assert await scheduler.submit("a", "open", "long:12", 12) == "LONG"

    assert asyncio.run(chunked_scheduler(100, 4, scenario)) == [[("s0", 1)], [("long:12", 12)]]


def test_without_decoding_the_chunk_size_does_not_apply():
    """No session stepping: a long prefill takes the whole budget, not the chunk size."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        passes.release.set()
        assert await scheduler.submit("a", "represent", "long:12", 12) == "LONG"

    assert asyncio.run(chunked_scheduler(100, 4, scenario)) == [[("long:12", 12)]]


def test_a_begun_prefill_whose_caller_went_away_is_dropped():
    """A caller that leaves between two chunks of its prefill: the rest is never run."""

    async def scenario(scheduler: Scheduler, passes: Chunked) -> None:
        gone = asyncio.create_task(scheduler.submit("a", "open", "gone:30", 30))
        await until(lambda: len(passes.seen) == 1)
        other = asyncio.create_task(scheduler.submit("b", "open", "other:3", 3))
        await asyncio.sleep(0)
        gone.cancel()
        passes.release.set()
        assert await other == "OTHER"
        assert scheduler.depth() == {"step": 0, "open": 0, "represent": 0}

    seen = asyncio.run(chunked_scheduler(10, None, scenario))
    assert seen == [[("gone:30", 10)], [("other:3", 3)]]


def test_a_caller_gone_while_its_iterations_step_pass_runs_is_left_out():
    """Work taken for an iteration whose caller leaves during an earlier pass of that iteration
    (the steps') is not run: its service may have dropped what it began meanwhile."""
    seen: list[list[str]] = []
    step_running, release = asyncio.Event(), asyncio.Event()

    async def execute(kind: Kind, jobs: Sequence[str], grants: Sequence[int]) -> list[str]:
        seen.append(list(jobs))
        if kind == "step":
            step_running.set()
            await release.wait()
        return [job.upper() for job in jobs]

    async def scenario() -> None:
        scheduler = Scheduler(execute, budget=10)
        scheduler.start()
        try:
            step = asyncio.create_task(scheduler.submit("k", "step", "s", 1, "s"))
            opening = asyncio.create_task(scheduler.submit("j", "open", "o", 1))
            await step_running.wait()
            opening.cancel()
            await asyncio.sleep(0)
            release.set()
            assert await step == "S"
            assert await scheduler.submit("j", "open", "later", 1) == "LATER"
        finally:
            await scheduler.stop()

    asyncio.run(scenario())
    assert seen == [["s"], ["later"]]
