"""A real server killed (SIGKILL) in the middle of a generation and started again on the same
port: `Generator` waits for it, re-opens its session and ends token-for-token as without."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_owner_client.client import PemaClient
from data_owner_client.data import Example
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from tests.uvicorn_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["w5 w9 w11", "w20", "w30 w31 w40 w41 w50 w7 w8 w60", "w44 w45"]


class TinyServer:
    """``python -m tests.tiny_server`` on a fixed port, which can be killed and started again."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log, self.process = port, log, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.tiny_server", "--port", str(self.port)]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        with PemaClient(self.url, retries=0) as client:
            deadline = time.monotonic() + 60
            while not client.health():
                assert time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


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
