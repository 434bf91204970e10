"""The API contract under an outside fuzzer: schemathesis against a real uvicorn server, every
operation, its coverage, fuzzing and stateful (open → step → close) phases, all checks.

Valid data may be refused only for the rules a JSON schema cannot state (see
``schemathesis_hooks.py``); schema-violating data must be refused; no 5xx; every answer matches
its documented schema.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from plm_owner_server.app import create_app
from plm_owner_server.settings import Settings
from tests.uvicorn_server import free_port, uvicorn_server

HERE = Path(__file__).parent
ST = Path(sys.executable).parent / "st"
# Small limits, so that the fuzzer reaches them (and the embedded model answers quickly).
LIMITS = dict(max_batch_size=8, max_request_tokens=256, max_new_tokens=16)


@pytest.fixture
def tiny_server(runner) -> Iterator[str]:
    """The tiny llama's app behind a real uvicorn server in a thread of this process."""
    port = free_port()
    app = create_app(Settings(**LIMITS), runner=runner)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def fuzz(url: str, examples: int, workdir: Path, seed: int = 7) -> None:
    """``st run`` with every check (our own in place of positive_data_acceptance)."""
    command = [
        str(ST), "--config-file", str(HERE / "schemathesis.toml"), "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(examples), "--seed", str(seed), "--no-color",
    ]  # fmt: skip
    root = str(HERE.parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "tests.server.schemathesis_hooks",
    }
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=workdir
    )  # st keeps its state in ./.schemathesis
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "Stateful" in report and "❌" not in report, report[-3000:]


def test_fuzzer_finds_no_failure_on_the_tiny_model(tiny_server, tmp_path):
    fuzz(tiny_server, examples=100, workdir=tmp_path)


@pytest.mark.slow
def test_fuzzer_finds_no_failure_on_the_embedded_model(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    with uvicorn_server("--log-level", "warning", *flags, log=tmp_path / "server.log") as url:
        fuzz(url, examples=30, workdir=tmp_path)
