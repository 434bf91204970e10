"""The serve engine's scheduling, over a stand-in generator: bursts share a session, sessions
hold what one server request may, the session pool is first come first served, cancelled and
left-over jobs end, and a job's own failure ends it alone."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from data_owner_client.generate import Batch, GenerationConfig, Job, Mixing, Row
from data_owner_client.serve.engine import Engine, EngineClosed, SessionPool


class StandIn:
    """A generator that decodes token 1 until each row's budget, recording the sessions."""

    def __init__(self, max_rows: int = 64, max_tokens: int = 10_000) -> None:
        limits = SimpleNamespace(max_batch_size=max_rows, max_request_tokens=max_tokens)
        self.served = SimpleNamespace(info=SimpleNamespace(limits=limits))
        self.opened: list[list[Job]] = []
        self.closed = 0
        self.fail_open = False

    def open(self, jobs: list[Job]) -> Batch:
        if self.fail_open:
            raise ConnectionError("the server is away")
        self.opened.append(jobs)
        return Batch(
            jobs, f"s{len(self.opened)}", torch.zeros(sum(len(j.rows) for j in jobs), 1), 0.0
        )

    def advance(self, batches: list[Batch]) -> None:
        for batch in batches:
            for b in batch.live:
                row, job = batch.rows[b], batch.owners[b]
                if job.cancelled:
                    row.finish_reason = "cancelled"
                    continue
                if job.config.temperature == 42:  # a job whose settings fail
                    job.error, row.finish_reason = ValueError("bad settings"), "error"
                    continue
                row.tokens.append(1)
                if len(row.tokens) >= row.budget:
                    row.finish_reason = "length"
            batch.live = [b for b in batch.live if batch.rows[b].finish_reason is None]
            if not batch.live:
                self.close(batch)

    def close(self, batch: Batch) -> None:
        if batch.session is not None:
            batch.session, self.closed = None, self.closed + 1

    def shutdown(self) -> None:
        pass


def job(rows: int = 1, budget: int = 3, prompt: int = 2, **settings) -> Job:
    config = GenerationConfig(**settings)
    mixing = Mixing(0.0, 0.0, "constant", None, None)
    made = [Row(list(range(prompt)), 1.0, budget) for _ in range(rows)]
    return Job(made, config, mixing, torch.Generator())


class Ends:
    """Collects each job's end: its error (None when it finished)."""

    def __init__(self) -> None:
        self.ended: dict[int, Exception | None] = {}
        self.steps = 0
        self.all = threading.Event()
        self.expected = 0

    def __call__(self, job: Job, error: Exception | None) -> None:
        if error is not None or job.finished:
            self.ended[id(job)] = error
            if len(self.ended) == self.expected:
                self.all.set()
        else:
            self.steps += 1

    def wait(self, expected: int) -> None:
        self.expected = expected
        if len(self.ended) < expected:
            assert self.all.wait(10), f"{len(self.ended)} of {expected} jobs ended"


def run(engine: Engine, jobs: list[Job]) -> Ends:
    ends = Ends()
    engine.start()
    for j in jobs:
        engine.submit(j, ends)
    ends.wait(len(jobs))
    engine.close()
    return ends


def test_a_burst_shares_one_session_within_the_server_bounds():
    generator = StandIn(max_rows=4, max_tokens=30)
    jobs = [job(rows=2), job(rows=2), job(rows=1), job(rows=1, prompt=26)]
    ends = run(Engine(generator, SessionPool(8), "m"), jobs)  # type: ignore[arg-type]
    assert all(error is None for error in ends.ended.values())
    assert all(row.tokens == [1, 1, 1] for j in jobs for row in j.rows)
    # 4 rows at most per session, and 30 tokens (prompts and budgets) at most.
    assert [[jobs.index(j) for j in opened] for opened in generator.opened] == [[0, 1], [2], [3]]
    assert generator.closed == 3 and ends.steps > 0


def test_a_request_beyond_one_session_is_refused():
    engine = Engine(StandIn(max_rows=4, max_tokens=30), SessionPool(1), "m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="5 sequences"):
        engine.submit(job(rows=5), Ends())
    with pytest.raises(ValueError, match="split it, or ask for fewer tokens"):
        engine.submit(job(budget=40), Ends())


def test_the_session_pool_serves_engines_in_the_order_they_asked():
    pool, a, b = SessionPool(1), object(), object()
    assert pool.acquire(a)
    assert not pool.acquire(b)  # b waits
    pool.release()
    assert not pool.acquire(a)  # a asked after b: b first
    assert pool.acquire(b)
    pool.release()
    assert pool.acquire(a)
    pool.withdraw(b)


def test_jobs_wait_for_a_session_and_two_models_share_the_pool():
    pool = SessionPool(1)
    first, second = StandIn(), StandIn()
    engines = [Engine(g, pool, name) for g, name in ((first, "a"), (second, "b"))]  # type: ignore[arg-type]
    ends = Ends()
    jobs = [job(budget=5) for _ in range(6)]
    for engine in engines:
        engine.start()
    for i, j in enumerate(jobs):
        engines[i % 2].submit(j, ends)
    ends.wait(len(jobs))
    for engine in engines:
        engine.close()
    assert all(error is None for error in ends.ended.values())
    assert first.opened and second.opened


def test_cancelled_waiting_jobs_and_jobs_left_at_close_end():
    pool = SessionPool(0)  # no session ever: everything waits
    engine = Engine(StandIn(), pool, "m")  # type: ignore[arg-type]
    ends = Ends()
    engine.start()
    waiting, cancelled = job(), job()
    engine.submit(waiting, ends)
    engine.submit(cancelled, ends)
    cancelled.cancelled = True
    ends.wait(1)
    assert ends.ended == {id(cancelled): None}
    engine.close()
    assert isinstance(ends.ended[id(waiting)], EngineClosed)
    with pytest.raises(EngineClosed):
        engine.submit(job(), ends)


def test_a_failing_job_ends_alone_and_a_failed_open_fails_its_jobs():
    generator = StandIn()
    bad, good = job(temperature=42), job(budget=4)
    ends = run(Engine(generator, SessionPool(2), "m"), [bad, good])  # type: ignore[arg-type]
    assert isinstance(ends.ended[id(bad)], ValueError) and ends.ended[id(good)] is None
    assert good.rows[0].tokens == [1, 1, 1, 1]
    generator = StandIn()
    generator.fail_open = True
    lost = job()
    ends = run(Engine(generator, SessionPool(2), "m"), [lost])  # type: ignore[arg-type]
    assert isinstance(ends.ended[id(lost)], ConnectionError)
