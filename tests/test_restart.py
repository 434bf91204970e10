"""A real server killed (SIGKILL) in the middle of a generation and started again on the same
port: `Generator` waits for it, re-opens its session and ends token-for-token as without."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from data_owner_client.client import PemaClient
from data_owner_client.data import Example
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from tests.tiny_server import TinyServer
from tests.uvicorn_server import free_port

PROMPTS = ["w5 w9 w11", "w20", "w30 w31 w40 w41 w50 w7 w8 w60", "w44 w45"]


@pytest.fixture
def server(tmp_path) -> Iterator[TinyServer]:
    server = TinyServer(free_port(), tmp_path / "server.log")
    server.start()
    server.wait_ready()
    yield server
    server.kill()


@pytest.mark.slow
def test_generation_survives_a_killed_and_restarted_server(server, tmp_path):
    examples = [Example(p, None) for p in PROMPTS]
    config = GenerationConfig(max_new_tokens=24, lambda_max=0.0, reconnect_s=60)
    with PemaClient(server.url, retries=0) as client:
        served = ServedModel.fetch(client, cache_dir=tmp_path / "cache")
        generator = Generator(client, served, config, "{source}")
        want = [g.token_ids for g in generator.generate(examples)]
        step, calls = client.step, []

        def step_then_kill(*args, **kwargs):
            calls.append(1)
            if len(calls) == 6:  # mid-decode: the server dies, and comes back a second later
                server.kill()
                threading.Timer(1.0, server.start).start()
            return step(*args, **kwargs)

        client.step = step_then_kill  # type: ignore[method-assign]
        got = [g.token_ids for g in generator.generate(examples)]
    assert got == want
    assert len(calls) > 6
