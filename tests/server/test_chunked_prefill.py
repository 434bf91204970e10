"""Chunked prefill: a session's prompts read a few columns per pass equal one whole prefill (the
transformers runner, every tiny architecture, sliding windows included), and through the server a
chunked opening or ``/v1/represent`` answers as an unchunked one."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from plm_owner_server.backend import open_sessions
from plm_owner_server.runner import ModelRunner
from plm_owner_server.serving import Opening
from shared.codec import decode_tensor
from shared.protocol import (
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from tests.server.helpers import answer, assert_same_logits, post, serve
from tests.server.test_scheduler import until
from tests.tiny_models import ARCHITECTURES

# Rows of different lengths (longer and shorter than the sliding windows of 4): the first chunk
# holds only the longest row's tokens, and the one-token row is read in the last chunk.
PROMPTS = [[5, 9, 17, 33, 8, 41, 60, 12, 7], [4, 70, 3], list(range(20, 32)), [11]]
ENDS = [2, 5, 6, 11, 12]  # chunk boundaries (columns of the right-aligned prompts)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_prefill_in_chunks_equals_one_whole_prefill(make_runner, arch):
    """Every row's f(c) at every position, the cache's shape and the steps after it."""
    runner: ModelRunner = make_runner(arch)
    ((whole, want),) = open_sessions(runner, [PROMPTS])
    (state,) = runner.start_sessions([PROMPTS])
    parts = [runner.prefill_sessions([(state, end)])[0] for end in ENDS]
    assert [len(p) for p in parts[0]] == [0, 0, 2, 0]  # only the longest row starts that early
    for row, (got, expected) in enumerate(zip(zip(*parts, strict=True), want, strict=True)):
        assert got[-1].shape[0] >= 1, f"row {row} ends in the last chunk"
        close(torch.cat(got), expected)
    assert (state.width, state.rows, state.prompt) == (whole.width, whole.rows, None)
    torch.testing.assert_close(state.mask, whole.mask, rtol=0, atol=0)
    for step in range(3):
        rows = [0, 1, 2, 3] if step < 2 else [0, 2]
        tokens = [(7 * step + r) % 90 + 3 for r in rows]
        close(runner.step_session(state, rows, tokens), runner.step_session(whole, rows, tokens))


def test_sessions_read_whole_share_a_pass_while_chunks_run_apart(runner, monkeypatch):
    """Sessions read whole at once are stacked into one forward; a chunk runs on its own."""
    calls: list[int] = []
    forward = runner._forward

    def counted(ids, *args, **kwargs):
        calls.append(ids.shape[0])
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(runner, "_forward", counted)
    a, b, c = runner.start_sessions([PROMPTS[:2], PROMPTS[2:], PROMPTS])
    runner.prefill_sessions([(a, 9), (b, 12), (c, 5)])
    assert calls == [4, 4]  # a and b together (2 + 2 rows), then c's chunk


def open_and_step(runner: ModelRunner, **settings: object) -> tuple[list, float]:
    """A session opened (every position, top-3 logits) and stepped twice: its answers, and how
    many open passes the server ran."""
    request = SessionOpenRequest(sequences=PROMPTS, positions="all", logits=3)
    with serve(runner, **settings) as client:
        opened = answer(post(client, "/v1/sessions", request), SessionOpenResponse, 201)
        path = f"/v1/sessions/{opened.session_id}/step"
        steps = [
            answer(
                post(client, path, SessionStepRequest(tokens=[6 + k] * 4, logits=3)),
                SessionStepResponse,
            )
            for k in range(2)
        ]
        registry = client.app.state.pema.metrics.registry
        passes = registry.get_sample_value("pema_pass_requests_count", {"kind": "open"})
    return [opened, *steps], passes


@pytest.mark.parametrize(("columns", "passes"), [(1, 6), (4, 3), (5, 3)])
def test_a_chunked_opening_answers_as_a_whole_one(runner, monkeypatch, columns, passes):
    """A 4 × 12 opening over a budget of 8 tokens is read 2 columns a pass (6 passes), or in
    multiples of the backend's columns (as vLLM reads whole blocks: 4 | 4 | 4, 5 | 5 | 2), and in
    one pass without chunking (12 is no multiple of 5): its positions, offsets, logits and the
    steps after it equal an unchunked server's."""
    monkeypatch.setattr(runner, "prefill_columns", columns)
    chunked, ran = open_and_step(runner, max_batch_tokens=8)
    whole, one = open_and_step(runner)
    assert (ran, one) == (passes, 1)
    assert chunked[0].offsets == whole[0].offsets
    for got, want in zip(chunked, whole, strict=True):
        close(decode_tensor(got.hidden), decode_tensor(want.hidden))
        assert_same_logits(got.logits, want.logits)


def test_a_chunked_represent_answers_as_a_whole_one(runner):
    """Rows of a /v1/represent request over the budget are read a few per pass (one over the
    budget alone): the answer equals an unchunked server's."""
    request = RepresentRequest(sequences=PROMPTS, start=[3, 0, 11, 0], logits=2)
    answers, passes = [], []
    for settings in ({"max_batch_tokens": 10}, {}):
        with serve(runner, **settings) as client:
            answers.append(answer(post(client, "/v1/represent", request), RepresentResponse))
            registry = client.app.state.pema.metrics.registry
            passes.append(
                registry.get_sample_value("pema_pass_requests_count", {"kind": "represent"})
            )
    assert passes == [4, 1]  # rows of 9 | 3 | 12 (over the budget: alone) | 1 token
    got, want = answers
    assert got.offsets == want.offsets
    close(decode_tensor(got.hidden), decode_tensor(want.hidden))
    assert_same_logits(got.logits, want.logits)


def test_a_failed_chunk_or_a_caller_gone_mid_opening_leaves_no_session(runner, monkeypatch):
    """A session is in the store from its opening's first chunk: if the caller goes away
    between chunks, or a later chunk's pass fails, it is dropped (nobody could close it)."""
    gate, calls = threading.Event(), []
    prefill = runner.prefill_sessions

    def gated(chunks):
        calls.append(len(chunks))
        if len(calls) == 2:  # the first opening's second chunk waits
            assert gate.wait(10)
        if len(calls) == 4:  # the second opening's second chunk fails
            raise RuntimeError("the model failed")
        return prefill(chunks)

    monkeypatch.setattr(runner, "prefill_sessions", gated)
    request = SessionOpenRequest(sequences=PROMPTS)
    with serve(runner, max_batch_tokens=8) as client:
        service = client.app.state.pema.sessions

        async def leave_mid_opening() -> None:
            opening = asyncio.create_task(service.open("anonymous", request))
            await until(lambda: len(calls) == 2)  # its first chunk ran; the second is held
            assert len(service.store) == 1
            opening.cancel()
            gate.set()
            await until(lambda: len(service.store) == 0)

        client.portal.call(leave_mid_opening)
        assert len(calls) == 2  # the rest of it never ran
        with pytest.raises(RuntimeError, match="the model failed"):
            post(client, "/v1/sessions", request)
        assert len(calls) == 4 and len(service.store) == 0


def test_an_opening_longer_than_the_ttl_is_answered_and_then_measured(runner, monkeypatch):
    """An opening whose chunks take longer than the idle TTL is in use all along: it is
    answered, steps, and from then on counts its cache as measured, not its reservation."""
    prefill = runner.prefill_sessions

    def slow(chunks):
        time.sleep(0.05)
        return prefill(chunks)

    monkeypatch.setattr(runner, "prefill_sessions", slow)
    with serve(runner, max_batch_tokens=8, session_ttl_s=0.12) as client:
        opened = answer(
            post(client, "/v1/sessions", SessionOpenRequest(sequences=PROMPTS)),
            SessionOpenResponse,
            201,
        )  # 6 chunks: 0.3 s
        (session,) = client.app.state.pema.sessions.store._sessions.values()
        assert (session.opening, session.reserved) == (False, 0)
        assert session.nbytes == session.state.nbytes
        step = SessionStepRequest(tokens=[6] * 4)
        assert post(client, f"/v1/sessions/{opened.session_id}/step", step).status_code == 200


def test_an_opening_abandoned_before_its_pass_reads_nothing(runner):
    """A caller that leaves after its opening was taken for a pass, before the pass ran: the
    pass skips it and no session is left behind."""
    with serve(runner) as client:
        service, work = client.app.state.pema.sessions, client.app.state.pema.work
        opening = Opening("anonymous", SessionOpenRequest(sequences=PROMPTS))
        client.portal.call(work.thread.run, service._abandon, opening)
        (result,) = client.portal.call(work.thread.run, service._open_pass, [opening], [8])
        assert isinstance(result, RuntimeError) and len(service.store) == 0
