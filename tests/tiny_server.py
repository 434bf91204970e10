"""``python -m tests.tiny_server --port P [--arch llama]``: a real uvicorn `pema-server` app over
a tiny model (the same seeded weights every time, so a restarted server serves the same model);
and :class:`TinyServer`, which runs it as a subprocess that tests can kill and start again."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import uvicorn

from data_owner_client.client import PemaClient
from plm_owner_server.app import create_app
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from tests.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


class TinyServer:
    """``python -m tests.tiny_server`` on a fixed port, which can be killed and started again."""

    def __init__(self, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        """``env``: ``PEMA_*`` settings of the server, e.g. a keys file or cache bound."""
        self.port, self.log, self.env = port, log, env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.tiny_server", "--port", str(self.port)]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--arch", default="llama")
    args = parser.parse_args()
    runner = ModelRunner(tiny_model(args.arch), tiny_tokenizer(), model_id=f"tiny-{args.arch}")
    app = create_app(Settings(port=args.port), runner=runner)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
