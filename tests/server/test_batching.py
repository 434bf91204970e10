"""Many data owners at once: sessions of different keys share passes and each gets the answer it
would get alone; round-robin and quotas per key; eviction in the middle of a shared pass."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from plm_owner_server.app import create_app
from plm_owner_server.auth import hash_key
from plm_owner_server.backend import open_sessions
from plm_owner_server.errors import ApiError
from plm_owner_server.kv import MAX_PADDING, KVState, width_groups
from plm_owner_server.quota import Quotas
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from shared.codec import decode_tensor, pack, unpack
from shared.protocol import (
    MSGPACK,
    RepresentRequest,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from tests.server.helpers import assert_error, assert_same_logits, post, serve
from tests.tiny_models import ARCHITECTURES

# Sessions of different row counts and prompt lengths (longer and shorter than gemma's window).
SESSIONS = [
    [[5, 9, 17, 33, 8, 41, 60, 12, 7], [4, 70, 3]],
    [[11, 12]],
    [[20, 21, 22, 23, 24, 25], [30], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]],
]
KEYS = ["pema_key-a", "pema_key-b", "pema_key-c"]


def step_tokens(step: int, session: int, rows: int) -> list[int]:
    return [(7 * step + 3 * session + r) % 90 + 3 for r in range(rows)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stacked_sessions_equal_each_session_alone(make_runner, arch):
    """Opening and stepping sessions together gives each session's own answers (≤ 1e-5; at every
    prompt position, as a plain forward of each row alone gives them) and leaves each with the
    cache it would have alone, also when rows finish at different steps."""
    runner: ModelRunner = make_runner(arch)
    alone = [runner.open_session(prompts) for prompts in SESSIONS]
    together = open_sessions(runner, SESSIONS)
    for prompts, (a, ha), (b, hb) in zip(SESSIONS, alone, together, strict=True):
        torch.testing.assert_close(torch.stack([h[-1] for h in hb]), ha, rtol=0, atol=1e-5)
        want = runner.represent(prompts, [0] * len(prompts), 4096)
        for got, row in zip(hb, want, strict=True):
            torch.testing.assert_close(got, row, rtol=0, atol=1e-5)
        assert (b.width, b.rows, b.nbytes) == (a.width, a.rows, a.nbytes)
    for step in range(8):
        rows = [list(state.rows) for state, _ in alone]
        if step == 3:
            rows[2] = [0, 2]  # a row finishes
        if step == 5:
            rows[0] = [1]
        tokens = [step_tokens(step, i, len(r)) for i, r in enumerate(rows)]
        want = [
            runner.step_session(s, r, t) for (s, _), r, t in zip(alone, rows, tokens, strict=True)
        ]
        got = runner.step_sessions(
            [(s, r, t) for (s, _), r, t in zip(together, rows, tokens, strict=True)]
        )
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    for (a, _), (b, _) in zip(alone, together, strict=True):
        assert (b.width, b.rows, b.nbytes) == (a.width, a.rows, a.nbytes)
        torch.testing.assert_close(b.mask, a.mask, rtol=0, atol=0)


class GatedSteps:
    """Wraps ``runner.step_sessions``: records each pass's session count; the first waits."""

    def __init__(self, step_sessions: Callable[..., list[torch.Tensor]]) -> None:
        self.step_sessions, self.passes, self.gate = step_sessions, [], threading.Event()

    def __call__(self, steps: Sequence[tuple[KVState, Any, Any]]) -> list[torch.Tensor]:
        self.passes.append(len(steps))
        if len(self.passes) == 1:
            assert self.gate.wait(10), "the test never opened the gate"
        return self.step_sessions(steps)


def write_keys(path: Path, *lines: tuple[str, str]) -> Path:
    path.write_text(
        "".join(f"{hash_key(k)} owner-{i} {extra}\n" for i, (k, extra) in enumerate(lines))
    )
    return path


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def call(client: httpx.AsyncClient, path: str, body: Any, key: str, model: Any) -> Any:
    headers = {"content-type": MSGPACK, "authorization": f"Bearer {key}"}
    response = await client.post(path, content=pack(body), headers=headers)
    assert response.status_code in (200, 201), response.text
    return unpack(response.content, model)


async def decode_together_then_alone(app: Any, gated: GatedSteps) -> tuple[list, list, Any]:
    """Each key opens a session; the first key's step holds the model while the others queue;
    after 4 shared steps (rows finishing) every session is decoded again alone."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pema") as client:

            async def session(i: int, together: bool) -> list[SessionStepResponse]:
                opened = await call(
                    client,
                    "/v1/sessions",
                    SessionOpenRequest(sequences=SESSIONS[i], logits=3),
                    KEYS[i],
                    SessionOpenResponse,
                )
                answers, rows = [], list(range(len(SESSIONS[i])))
                for step in range(4):
                    if step == 2 and len(rows) > 1:
                        rows = rows[1:]
                    if together and step == 0 and i > 0:
                        await until(lambda: len(gated.passes) >= 1)  # queue behind the held pass
                    body = SessionStepRequest(
                        tokens=step_tokens(step, i, len(rows)), rows=rows, logits=3
                    )
                    path = f"/v1/sessions/{opened.session_id}/step"
                    answers.append(await call(client, path, body, KEYS[i], SessionStepResponse))
                return answers

            tasks = [asyncio.create_task(session(i, True)) for i in range(len(SESSIONS))]
            await until(lambda: app.state.pema.work.scheduler.depth()["step"] == len(KEYS) - 1)
            gated.gate.set()
            together = await asyncio.gather(*tasks)
            passes_together = list(gated.passes)
            alone = [await session(i, False) for i in range(len(SESSIONS))]
            return together, alone, passes_together


def test_steps_of_different_keys_share_passes_and_answer_as_alone(runner, tmp_path, monkeypatch):
    """Three keys decode at once through the app: steps that queued while a pass ran share the
    next pass, and every answer (hidden and top-k) equals the same session decoded alone."""
    gated = GatedSteps(runner.step_sessions)
    monkeypatch.setattr(runner, "step_sessions", gated)
    keys = write_keys(tmp_path / "keys", *((k, "") for k in KEYS))
    app = create_app(Settings(api_keys_file=keys), runner=runner)
    together, alone, passes = asyncio.run(decode_together_then_alone(app, gated))
    assert passes[0] == 1 and passes[1] >= len(KEYS) - 1  # the held step, then the queued ones
    for session_together, session_alone in zip(together, alone, strict=True):
        for got, want in zip(session_together, session_alone, strict=True):
            torch.testing.assert_close(
                decode_tensor(got.hidden), decode_tensor(want.hidden), rtol=0, atol=1e-5
            )
            assert_same_logits(got.logits, want.logits)
    registry = app.state.pema.metrics.registry
    assert registry.get_sample_value("pema_pass_keys_sum", {"kind": "step"}) > len(passes)
    for i, prompts in enumerate(SESSIONS):
        rows = len(prompts)
        stepped = 2 * rows + 2 * max(rows - 1, 1)
        served = registry.get_sample_value("pema_key_tokens_total", {"key": f"owner-{i}"})
        assert served == 2 * (sum(map(len, prompts)) + stepped)  # decoded together, then alone


def test_eviction_in_the_middle_of_a_shared_pass(runner):
    """When a session's step in a shared pass outgrows the memory bound, the least recently used
    other session of the pass is evicted: its answer in the pass stands, its next step is 404."""
    per_token, bound = runner.kv_bytes_per_token, 2**20
    # Two sessions of rows × width fit after one of them steps, not after both do.
    rows, width = next(
        (r, w)
        for r in range(32, 256)
        for w in range(2, 100)
        if per_token * r * (2 * w + 1) <= bound < per_token * r * (2 * w + 2)
    )
    with serve(runner, max_kv_cache_mib=1) as client:
        body = SessionOpenRequest(sequences=[[5] * width] * rows)
        opened: list[SessionOpenResponse] = []
        for _ in range(2):
            opened.append(unpack(post(client, "/v1/sessions", body).content, SessionOpenResponse))
        work = client.app.state.pema.work
        old, new = opened[0].session_id, opened[1].session_id
        jobs = [
            ("anonymous", old, SessionStepRequest(tokens=[6] * rows)),
            ("anonymous", new, SessionStepRequest(tokens=[6] * rows)),
        ]
        results = client.portal.call(work.thread.run, work.passes["step"], jobs, [rows] * 2)
        assert all(isinstance(r, SessionStepResponse) for r in results)
        assert_error(
            post(client, f"/v1/sessions/{old}/step", SessionStepRequest(tokens=[7] * rows)),
            404,
            "session_not_found",
        )
        response = post(client, f"/v1/sessions/{new}/step", SessionStepRequest(tokens=[7] * rows))
        assert response.status_code == 200, response.text


def test_quota_refuses_with_retry_after_and_spares_other_keys(runner, tmp_path):
    """A key over its tokens-per-minute quota gets 429 with Retry-After; a request bigger than
    the quota gets 413; another key is not affected."""
    keys = write_keys(tmp_path / "keys", (KEYS[0], "tokens_per_minute=20"), (KEYS[1], ""))
    with serve(runner, api_keys_file=keys) as client:

        def represent(key: str, tokens: int) -> httpx.Response:
            body = RepresentRequest(sequences=[[5] * tokens])
            return post(client, "/v1/represent", body, {"authorization": f"Bearer {key}"})

        assert represent(KEYS[0], 15).status_code == 200
        refused = represent(KEYS[0], 15)
        assert_error(refused, 429, "quota_exceeded")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert_error(represent(KEYS[0], 21), 413, "over_quota")
        for _ in range(3):
            assert represent(KEYS[1], 15).status_code == 200


def test_quota_refills_over_time():
    """The bucket refills at limit/60 tokens per second, up to the limit."""
    now = [0.0]
    quotas = Quotas({"a": 60}, default=None, clock=lambda: now[0])
    quotas.charge("a", 60)
    with pytest.raises(ApiError) as refused:
        quotas.charge("a", 10)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "10"
    now[0] = 10.0
    quotas.charge("a", 10)
    now[0] = 1000.0
    quotas.charge("a", 60)  # refilled to the limit, not beyond
    with pytest.raises(ApiError):
        quotas.charge("a", 1)
    quotas.charge("b", 10**9)  # no limit for keys without one


def test_default_quota_applies_to_keys_without_their_own():
    quotas = Quotas({"a": 100}, default=10, clock=lambda: 0.0)
    quotas.charge("a", 50)
    with pytest.raises(ApiError):
        quotas.charge("b", 11)


def test_a_long_session_never_pads_a_batch_of_short_ones():
    """Stacks group sessions of similar widths: padding stays within MAX_PADDING of the cells."""
    assert width_groups([(2048, 1), (8, 256)]) == [[0], [1]]
    assert width_groups([(70, 1)] * 4) == [[0, 1, 2, 3]]
    for sizes in ([(40, 1), (12, 1), (10, 2), (9, 3)], [(100, 4), (90, 4), (30, 64), (3, 1)]):
        groups = width_groups(sizes)
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
        for group in groups:
            widest = max(sizes[i][0] for i in group)
            cells = sum(sizes[i][0] * sizes[i][1] for i in group)
            assert widest * sum(sizes[i][1] for i in group) <= MAX_PADDING * cells
