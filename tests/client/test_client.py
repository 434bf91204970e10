from __future__ import annotations

import threading
import time

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
