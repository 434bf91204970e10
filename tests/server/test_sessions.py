"""Generation sessions: open, step, close, ragged rows, idle TTL, per-key caps, memory bound."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from fastapi.testclient import TestClient

from plm_owner_server.errors import ApiError
from plm_owner_server.runner import ModelRunner
from plm_owner_server.sessions import Session, SessionStore
from shared.codec import decode_tensor
from shared.protocol import (
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from tests.server.helpers import answer, assert_error, assert_same_logits, post, serve

PROMPTS = [[5, 9, 17, 33, 8], [4, 70, 3], [11, 12, 13, 14]]
HIDDEN = 32


def open_session(client: TestClient, sequences: list[list[int]], **fields) -> SessionOpenResponse:
    body = SessionOpenRequest(sequences=sequences, **fields)
    return answer(post(client, "/v1/sessions", body), SessionOpenResponse, status=201)


def step(client: TestClient, session_id: str, tokens: list[int], **fields):
    """The raw answer to one step (rows default to all live rows)."""
    body = SessionStepRequest(tokens=tokens, **fields)
    return post(client, f"/v1/sessions/{session_id}/step", body)


def last_representation(runner: ModelRunner, row: list[int]) -> torch.Tensor:
    """f(c) of the row's last position from a full forward of the row alone."""
    return runner.represent([row], [len(row) - 1], max_batch_tokens=1024)[0][0]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def client(runner: ModelRunner) -> Iterator[TestClient]:
    with serve(runner) as client:
        yield client


def test_open_step_close(client, runner):
    """Open is 201 with each row's last representation, step is 200, close is 204, then 404."""
    opened = open_session(client, PROMPTS)
    hidden = decode_tensor(opened.hidden)
    assert hidden.shape == (len(PROMPTS), HIDDEN)
    assert opened.fingerprint == runner.fingerprint
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(
            hidden[b], last_representation(runner, prompt), atol=1e-5, rtol=0
        )
    stepped = answer(step(client, opened.session_id, [20, 21, 22]), SessionStepResponse)
    assert stepped.hidden.shape == [len(PROMPTS), HIDDEN]
    path = f"/v1/sessions/{opened.session_id}"
    closed = client.delete(path)
    assert closed.status_code == 204 and closed.content == b""
    assert_error(step(client, opened.session_id, [20, 21, 22]), 404, "session_not_found")
    assert_error(client.delete(path), 404, "session_not_found")


def test_rows_finishing_at_different_steps_equal_full_forwards(client, runner):
    """Rows left out finish; every step's answer equals a full forward over that row's tokens."""
    opened = open_session(client, PROMPTS, logits=4)
    rows = [list(p) for p in PROMPTS]
    plan = [([0, 1, 2], [20, 21, 22]), ([0, 2], [23, 24]), ([2], [25])]
    for live, tokens in plan:
        got = answer(
            step(client, opened.session_id, tokens, rows=live, logits=4), SessionStepResponse
        )
        hidden = decode_tensor(got.hidden)
        assert hidden.shape == (len(live), HIDDEN)
        for i, (b, token) in enumerate(zip(live, tokens, strict=True)):
            rows[b].append(token)
            want = last_representation(runner, rows[b])
            torch.testing.assert_close(hidden[i], want, atol=1e-5, rtol=0)
        values, indices = runner.logits(hidden, 4)
        assert torch.equal(decode_tensor(got.logits.indices), indices)
    error = assert_error(step(client, opened.session_id, [26], rows=[0]), 422, "row_not_live")
    assert "live: [2]" in error.message


def test_forked_rows_continue_exactly_as_their_parents_would(client, runner):
    """``parents`` forks and reorders rows (beam search): each row of the step continues a copy
    of its parent, equal to a full forward over the parent's tokens and its own."""
    opened = open_session(client, PROMPTS)
    rows = {b: list(p) for b, p in enumerate(PROMPTS)}
    # Row 2 goes on as two rows, row 0 as one under a new name; row 1 is finished.
    plan = [([2, 0, 2], [7, 8, 9], [0, 1, 5]), ([5, 0, 5], [3, 3, 4], None)]
    for parents, tokens, names in plan:
        got = answer(
            step(client, opened.session_id, tokens, parents=parents, rows=names),
            SessionStepResponse,
        )
        hidden = decode_tensor(got.hidden)
        rows = {
            name: rows[parent] + [token]
            for name, parent, token in zip(names or range(3), parents, tokens, strict=True)
        }
        for i, row in enumerate(rows.values()):
            torch.testing.assert_close(
                hidden[i], last_representation(runner, row), atol=1e-5, rtol=0
            )
    assert sorted(rows) == [0, 1, 2]  # named by position when rows are not given
    error = assert_error(step(client, opened.session_id, [1], parents=[5]), 422, "row_not_live")
    assert "rows [5]" in error.message
    mismatched = {"tokens": [1, 2], "parents": [0]}
    got = client.post(f"/v1/sessions/{opened.session_id}/step", json=mismatched)
    assert "parents has 1 entries" in assert_error(got, 422, "inconsistent_request").message


def test_a_fork_past_the_row_or_memory_limits_is_refused_and_loses_nothing(runner):
    """Forking past max_batch_size rows, or into caches that could never fit the KV bound, is a
    413 before anything is copied; the session steps on as before."""
    width = 100
    per_row = runner.kv_bytes_per_token * width
    with serve(runner, max_batch_size=64, max_kv_cache_mib=1) as client:
        opened = open_session(client, [[5] * width])
        error = assert_error(
            step(client, opened.session_id, [1] * 65, parents=[0] * 65), 413, "batch_too_large"
        )
        assert "the limit is 64" in error.message
        rows = 2**20 // per_row + 1  # more copies than the bound holds
        assert rows <= 64, "the test needs a bound below 64 rows"
        error = assert_error(
            step(client, opened.session_id, [1] * rows, parents=[0] * rows),
            413,
            "session_too_large",
        )
        assert "fewer beams" in error.message
        got = answer(step(client, opened.session_id, [7]), SessionStepResponse)
        want = last_representation(runner, [5] * width + [7])
        torch.testing.assert_close(decode_tensor(got.hidden)[0], want, atol=1e-5, rtol=0)


def test_step_logits_match_open_logits_mode(client, runner):
    """Steps answer with the logits asked for, as /v1/represent would."""
    opened = open_session(client, PROMPTS[:2], logits="full")
    full = runner.logits(decode_tensor(opened.hidden), "full")
    torch.testing.assert_close(decode_tensor(opened.logits), full, atol=1e-5, rtol=0)
    plain = answer(step(client, opened.session_id, [20, 21]), SessionStepResponse)
    assert_same_logits(plain.logits, None)


def test_idle_session_expires_after_the_ttl(runner):
    """A session used more often than the TTL lives on; left idle, it is a 404."""
    ttl, gap = 0.8, 0.45
    with serve(runner, session_ttl_s=ttl) as client:
        opened = open_session(client, [[5, 6]])
        for token in (7, 8):  # together longer than the TTL, each gap well within it
            time.sleep(gap)
            answer(step(client, opened.session_id, [token]), SessionStepResponse)
        time.sleep(ttl + 0.2)
        error = assert_error(step(client, opened.session_id, [9]), 404, "session_not_found")
        assert f"expired after {ttl:g} s idle" in error.message


def test_sweeper_frees_idle_sessions_without_requests(runner):
    """Idle sessions' caches are freed by the background sweeper, not only on the next request."""
    with serve(runner, session_ttl_s=0.5) as client:
        state = client.app.state.pema
        open_session(client, [[5, 6, 7]])
        open_session(client, [[8]])
        store = state.sessions.store
        assert len(store) == 2 and store.nbytes > 0
        wait_until(lambda: len(store) == 0)
        registry = state.metrics.registry
        assert registry.get_sample_value("pema_sessions_open") == 0
        assert registry.get_sample_value("pema_kv_cache_bytes") == 0
        assert registry.get_sample_value("pema_sessions_evicted_total") == 2


def test_an_opening_returns_every_prompt_position_when_asked(client, runner):
    """``positions: "all"``: each row's f(c) at every prompt position, as /v1/represent gives
    them (one prefill for the session and the side model), with offsets; the logits stay the
    last positions', and the session steps as any other."""
    opened = open_session(client, PROMPTS, positions="all", logits=3)
    hidden = decode_tensor(opened.hidden)
    assert opened.offsets == [0, 5, 8, 12] and hidden.shape == (12, HIDDEN)
    want = runner.represent(PROMPTS, [0] * len(PROMPTS), max_batch_tokens=1024)
    torch.testing.assert_close(hidden, torch.cat(want), atol=1e-5, rtol=0)
    last = open_session(client, PROMPTS, logits=3)
    assert last.offsets is None
    assert_same_logits(opened.logits, last.logits)
    stepped = answer(step(client, opened.session_id, [20, 21, 22]), SessionStepResponse)
    torch.testing.assert_close(
        decode_tensor(stepped.hidden)[1], last_representation(runner, PROMPTS[1] + [21]),
        atol=1e-5, rtol=0,
    )  # fmt: skip


def test_sessions_per_key_are_capped(runner):
    """Past max_sessions_per_key an open is a 429; closing one makes room."""
    with serve(runner, max_sessions_per_key=2) as client:
        first, _ = open_session(client, [[5]]), open_session(client, [[6]])
        error = assert_error(
            post(client, "/v1/sessions", {"sequences": [[7]]}), 429, "too_many_sessions"
        )
        assert "DELETE /v1/sessions/{id}" in error.message
        assert client.delete(f"/v1/sessions/{first.session_id}").status_code == 204
        open_session(client, [[7]])


def test_memory_bound_evicts_the_least_recently_used_session(runner):
    """Opening past the KV-cache bound evicts the least recently used session; the bound holds."""
    bound, rows, width = 2**20, 8, 100
    size = runner.kv_bytes_per_token * rows * width
    fit = bound // size
    assert fit >= 3, "the test needs room for several sessions"
    prompts = [[5 + b] * width for b in range(rows)]
    with serve(runner, max_kv_cache_mib=1) as client:
        store = client.app.state.pema.sessions.store
        ids = [open_session(client, prompts).session_id for _ in range(fit)]
        assert len(store) == fit and store.nbytes <= bound
        # Session 0 is used again, so session 1 is now the least recently used.
        answer(step(client, ids[0], [20] * rows), SessionStepResponse)
        ids.append(open_session(client, prompts).session_id)
        assert store.nbytes <= bound
        assert_error(step(client, ids[1], [21] * rows), 404, "session_not_found")
        for session_id in [ids[0], *ids[2:]]:
            answer(step(client, session_id, [21] * rows), SessionStepResponse)
        assert store.nbytes <= bound


def test_session_larger_than_the_bound_is_refused_and_loses_nothing(runner):
    """A session that could never fit is a 413, and stored sessions are not evicted for it."""
    rows = 48
    assert runner.kv_bytes_per_token * rows * 100 > 2**20
    with serve(runner, max_kv_cache_mib=1) as client:
        store = client.app.state.pema.sessions.store
        kept = [open_session(client, [[5] * 100] * 4).session_id for _ in range(2)]
        before = store.nbytes
        error = assert_error(
            post(client, "/v1/sessions", {"sequences": [[6] * 100] * rows}),
            413,
            "session_too_large",
        )
        assert "send fewer or shorter prompts" in error.message
        assert "1.2 MiB" in error.message and "1.0 MiB" in error.message
        assert len(store) == 2 and store.nbytes == before
        for session_id in kept:
            answer(step(client, session_id, [7] * 4), SessionStepResponse)


def test_session_outgrowing_the_bound_is_closed(runner):
    """A step that makes a session alone exceed the bound closes it with a 413."""
    per_token, bound = runner.kv_bytes_per_token, 2**20
    rows = 80
    width = bound // (per_token * rows)  # fills the bound; one more token per row does not fit
    assert per_token * rows * (width + 1) > bound
    with serve(runner, max_kv_cache_mib=1) as client:
        store = client.app.state.pema.sessions.store
        opened = open_session(client, [[5] * width] * rows)
        error = assert_error(step(client, opened.session_id, [6] * rows), 413, "session_too_large")
        assert "fewer rows or fewer new tokens" in error.message
        assert len(store) == 0
        assert_error(step(client, opened.session_id, [6] * rows), 404, "session_not_found")


# SessionStore on its own, with a fake clock and fake caches.


@dataclass
class FakeCache:
    nbytes: int


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_session(owner: str = "alice", nbytes: int = 10) -> Session:
    return Session(owner, FakeCache(nbytes), "float32", prompt_len=1)  # type: ignore[arg-type]


def make_store(clock: FakeClock, ttl_s=10.0, max_per_owner=3, max_bytes=100) -> SessionStore:
    return SessionStore(ttl_s, max_per_owner, max_bytes, clock=clock)


def test_store_expires_sessions_idle_past_the_ttl():
    """Use resets the idle clock; only sessions idle longer than the TTL are dropped."""
    clock = FakeClock()
    store = make_store(clock)
    old, young = fake_session(), fake_session()
    store.add(old)
    clock.now = 6.0
    store.add(young)
    clock.now = 9.0
    store.get(old.id, "alice")  # idle 9 s < 10 s: still there, and its idle clock restarts
    clock.now = 16.5
    assert store.expire() == 1
    with pytest.raises(ApiError) as raised:
        store.get(young.id, "alice")
    assert raised.value.status == 404 and raised.value.code == "session_not_found"
    assert store.get(old.id, "alice") is old
    clock.now = 30.0
    assert store.expire() == 1 and len(store) == 0 and store.evicted == 2


def test_store_evicts_least_recently_used_to_fit():
    """Over the byte bound, the least recently used sessions go first; the newest stays."""
    store = make_store(FakeClock(), max_bytes=100, max_per_owner=10)
    a, b, c, d = (fake_session(nbytes=30) for _ in range(4))
    for session in (a, b, c):
        store.add(session)
    store.get(a.id, "alice")  # order of use: b, c, a
    store.add(d)  # 120 > 100: b goes
    big = fake_session(nbytes=40)
    store.add(big)  # 130 > 100: c goes, not a, the first one added
    assert len(store) == 3 and store.nbytes == 100 and store.evicted == 2
    for gone in (b, c):
        with pytest.raises(ApiError, match="evicted"):
            store.get(gone.id, "alice")
    assert [store.get(s.id, "alice") for s in (a, d, big)] == [a, d, big]


def test_store_refuses_what_can_never_fit_and_closes_what_outgrows():
    """check_room refuses sessions over the bound; update closes one that outgrew it alone."""
    store = make_store(FakeClock(), max_bytes=100)
    with pytest.raises(ApiError) as raised:
        store.check_room("alice", 101)
    assert (raised.value.status, raised.value.code) == (413, "session_too_large")
    session = fake_session(nbytes=60)
    store.add(session)
    session.state.nbytes = 120
    with pytest.raises(ApiError) as raised:
        store.update(session)
    assert (raised.value.status, raised.value.code) == (413, "session_too_large")
    assert len(store) == 0


def test_store_caps_sessions_per_owner():
    """The cap counts each owner's sessions separately."""
    store = make_store(FakeClock(), max_per_owner=2)
    store.add(fake_session("alice"))
    store.add(fake_session("alice"))
    with pytest.raises(ApiError) as raised:
        store.check_room("alice", 10)
    assert (raised.value.status, raised.value.code) == (429, "too_many_sessions")
    store.check_room("bob", 10)


def test_a_key_at_its_cap_reclaims_its_least_recently_used_idle_session():
    """Sessions in use are kept (429 with the seconds until one is idle enough); once the least
    recently used one has been idle for reclaim_s it makes room, and it alone; another key's
    sessions, however idle, are never touched."""
    clock = FakeClock()
    store = SessionStore(1000.0, 2, 1000, clock=clock, reclaim_s=5.0)
    bobs, old, young = fake_session("bob"), fake_session(), fake_session()
    for session in (bobs, old, young):
        store.add(session)
        clock.now += 1.0  # old last used at 1, young at 2; now 3
    with pytest.raises(ApiError) as raised:
        store.check_room("alice", 10)
    assert (raised.value.status, raised.value.code) == (429, "too_many_sessions")
    assert raised.value.headers == {"Retry-After": "3"}  # old is idle for 2 s of 5
    assert "retry in 3 s" in raised.value.message and len(store) == 3
    clock.now = 5.5
    store.get(old.id, "alice")  # used again: young is now the least recently used
    clock.now = 7.0
    store.check_room("alice", 10)  # young, idle for 5 s, is reclaimed
    assert store.get(old.id, "alice") is old and store.get(bobs.id, "bob") is bobs
    with pytest.raises(ApiError, match="does not exist"):
        store.get(young.id, "alice")
    assert store.evicted == 1


def test_a_session_still_opening_is_never_evicted_expired_or_reclaimed():
    """While its prompts are read in chunks a session is in use: its key's reclaim, the TTL and
    the byte bound pass it by (the least recently used of all, each time)."""
    clock = FakeClock()
    store = make_store(clock, ttl_s=100.0, max_per_owner=2, max_bytes=100)
    store.reclaim_s = 5.0
    opening, idle = fake_session(nbytes=50), fake_session(nbytes=30)
    opening.reserved = 50  # still opening
    store.add(opening)
    store.add(idle)
    clock.now = 20.0  # both idle past the reclaim time
    store.check_room("alice", 10)  # the key's cap: idle goes
    assert opening.id in store and idle.id not in store
    clock.now = 200.0  # past the TTL
    assert store.expire() == 0 and opening.id in store
    grown = fake_session("bob", nbytes=40)
    store.add(grown)
    grown.state.nbytes = 60  # 50 + 60 > 100: the opening stays, grown is closed
    with pytest.raises(ApiError, match="outgrew"):
        store.update(grown)
    assert opening.id in store and grown.id not in store


def test_store_hides_and_keeps_other_owners_sessions():
    """Another owner can neither see nor remove a session."""
    store = make_store(FakeClock())
    session = fake_session("alice")
    store.add(session)
    for call in (store.get, store.remove):
        with pytest.raises(ApiError) as raised:
            call(session.id, "bob")
        assert raised.value.status == 404
    assert store.get(session.id, "alice") is session
    store.remove(session.id, "alice")
    assert len(store) == 0 and store.evicted == 0


def test_store_reports_changes():
    """on_change sees the store after every add, update, removal and expiry."""
    clock, seen = FakeClock(), []
    store = SessionStore(
        10.0, 3, 100, clock=clock, on_change=lambda s: seen.append((len(s), s.nbytes))
    )
    session = fake_session(nbytes=40)
    store.add(session)
    session.state.nbytes = 50
    store.update(session)
    other = fake_session(nbytes=5)
    store.add(other)
    store.remove(other.id, "alice")
    clock.now = 11.0
    store.expire()
    assert seen == [(1, 40), (1, 50), (2, 55), (1, 50), (0, 0)]


def test_store_with_real_caches_measures_their_bytes(runner):
    """Real KV caches from the runner are measured as kv_bytes_per_token × rows × width."""
    store = make_store(FakeClock(), max_bytes=2**20)
    state, _ = runner.open_session([[5, 6, 7], [8]])
    session = Session("alice", state, "float32", prompt_len=3)
    store.add(session)
    assert store.nbytes == runner.kv_bytes_per_token * 2 * 3
    runner.step_session(state, [0], [9])
    store.update(session)
    assert store.nbytes == runner.kv_bytes_per_token * 1 * 4
