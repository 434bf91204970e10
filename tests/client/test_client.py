from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from data_owner_client.client import PemaClient, pipelined
from plm_owner_server.runner import ModelRunner


def test_head_applied_to_representations_equals_server_logits(
    client: PemaClient, runner: ModelRunner
) -> None:
    head = client.head()
    out = client.represent([[1, 5, 9, 12], [1, 7]], logits="full")
    assert isinstance(out.logits, torch.Tensor)
    torch.testing.assert_close(head(out.hidden), out.logits, rtol=0, atol=1e-4)
    assert out.fingerprint == client.model_info().fingerprint == runner.fingerprint


def test_pipelined_keeps_order_and_bounds_what_is_in_flight():
    """Answers come in input order; calls overlap, but never beyond the window or max_calls."""
    lock, live, peak = threading.Lock(), [0], [0]

    def call(item: tuple[int, int]) -> int:
        with lock:
            live[0] += item[1]
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02 * (item[0] % 3))  # later items may finish first
        with lock:
            live[0] -= item[1]
        return item[0]

    items = [(i, 3) for i in range(12)]
    assert list(pipelined(call, items, lambda item: item[1], window=9)) == list(range(12))
    assert 3 < peak[0] <= 9  # overlapped, within the window
    peak[0] = 0
    assert list(pipelined(call, items, lambda item: item[1], window=99, max_calls=2)) == list(
        range(12)
    )
    assert peak[0] <= 6
    # One item costlier than the window still runs (alone).
    assert list(pipelined(call, [(0, 50), (1, 3)], lambda item: item[1], window=9)) == [0, 1]


def test_pipelined_raises_the_first_error_in_order():
    def call(i: int) -> int:
        if i == 2:
            raise ValueError("server said no")
        return i

    answers = pipelined(call, list(range(6)), lambda i: 1, window=4)
    assert [next(answers), next(answers)] == [0, 1]
    with pytest.raises(ValueError, match="server said no"):
        next(answers)


def scripted(answers: list, seen: list[str]) -> httpx.Client:
    """An httpx client whose transport answers each request with the next scripted item (a
    status code with headers, or an exception to raise)."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer
        return httpx.Response(status, headers=headers, json={"status": "ok"})

    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://pema")


def test_retries_wait_for_retry_after_and_back_off(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    answers = [(429, {"Retry-After": "3"}), (503, {}), (429, {"Retry-After": "600"}), (200, {})]
    seen: list[str] = []
    client = PemaClient(http=scripted(answers, seen), retries=4, backoff=0.5)
    assert client._request("GET", "/v1/model").status_code == 200
    assert slept == [3.0, 1.0, 60.0]  # the server's wait, the backoff, the wait capped


def test_state_changing_requests_are_resent_only_if_never_sent(monkeypatch):
    """A step whose answer was lost may have been done: it is not resent; one that could not
    connect is."""
    monkeypatch.setattr(time, "sleep", lambda s: None)
    request = httpx.Request("POST", "http://pema/v1/sessions/s/step")
    seen: list[str] = []
    lost = [httpx.ReadError("reset", request=request), (200, {})]
    client = PemaClient(http=scripted(lost, seen), retries=3)
    with pytest.raises(httpx.ReadError):
        client._request("POST", "/v1/sessions/s/step", idempotent=False)
    assert len(seen) == 1
    refused = [httpx.ConnectError("refused", request=request), (200, {})]
    client = PemaClient(http=scripted(refused, seen := []), retries=3)
    assert client._request("POST", "/v1/sessions/s/step", idempotent=False).status_code == 200
    assert len(seen) == 2
    again = [httpx.ReadError("reset", request=request), (200, {})]
    client = PemaClient(http=scripted(again, seen := []), retries=3)
    assert client._request("GET", "/v1/model").status_code == 200  # reading is always safe
