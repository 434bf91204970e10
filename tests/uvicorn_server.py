"""A real `pema-server` (uvicorn) subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def uvicorn_server(
    *flags: str,
    log: Path,
    env: dict[str, str] | None = None,
    module: str = "plm_owner_server",
    health: str = "/v1/health",
) -> Iterator[str]:
    """``python -m MODULE FLAGS --port P`` (default: pema-server); yields its URL once
    ``health`` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", module, *flags, "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url + health):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"{module} did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False
