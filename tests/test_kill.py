"""A real `pema-client` process killed with SIGKILL in the middle of its work, then run again:
the memory build, and the adapter's training, end byte-identical to an uninterrupted run; a
client killed with its sessions open does not lock its key out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_owner_client.client import PemaClient, ServerError
from tests.tiny_server import ROOT, TinyServer
from tests.uvicorn_server import free_port
from tests.word_cipher import cipher_rows, write_jsonl

pytestmark = pytest.mark.slow
MEMORY_FLAGS = (
    "--source-field=src", "--target-field=tgt", "--template={source}", "--memory-dtype=float32",
    "--memory-batch-size=8", "--shard-examples=24", "--requests-in-flight=1", "--no-progress",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TinyServer]:
    server = TinyServer(free_port(), tmp_path_factory.mktemp("server") / "log")
    server.start()
    server.wait_ready()
    yield server
    server.kill()


def client(server: TinyServer, *argv: str) -> list[str]:
    return [sys.executable, "-m", "data_owner_client", "--server", server.url, *argv]


def run(command: list[str], cache: Path) -> None:
    env = {**os.environ, "PEMA_CLIENT_CACHE": str(cache)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_when(command: list[str], cache: Path, ready: Callable[[], bool]) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (fail if it ends first)."""
    env = {**os.environ, "PEMA_CLIENT_CACHE": str(cache)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, "the command ended before the kill"
        assert time.monotonic() < deadline, "never reached the point of the kill"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def files(folder: Path, *names: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name in names or (
        p.name.startswith("shard-"))}  # fmt: skip


def shards_recorded(memory: Path) -> int:
    try:
        return len(json.loads((memory / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def in_stage_two(log: Path) -> bool:
    """Whether training logged a record of its second stage (the memory is built by then)."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return False
    return any(json.loads(line).get("stage") == 2 for line in lines[:-1])  # the last may be cut


def test_memory_build_killed_resumes_byte_identical(server, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", cipher_rows(1200))
    build = ("memory", "build", "--data", str(data), *MEMORY_FLAGS)
    run(client(server, *build, "--out", str(tmp_path / "whole")), tmp_path / "cache")
    killed = tmp_path / "killed"
    command = client(server, *build, "--out", str(killed))
    kill_when(command, tmp_path / "cache", lambda: shards_recorded(killed / "train") >= 3)
    assert not (json.loads((killed / "train" / "manifest.json").read_text())["complete"])
    run(command, tmp_path / "cache")
    for part, shards in (("train", 45), ("dev", 5)):  # 1,080 and 120 examples, 24 per shard
        want = files(tmp_path / "whole" / part, "manifest.json")
        assert len(want) == 1 + shards and files(killed / part, "manifest.json") == want


def test_training_killed_resumes_byte_identical(server, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", cipher_rows(300))
    train = ("train", "--data", str(data), *MEMORY_FLAGS, "--rank=16", "--stage1-epochs=2",
             "--stage2-epochs=60", "--patience=60", "--resume")  # fmt: skip
    run(client(server, *train, "--out", str(tmp_path / "whole")), tmp_path / "cache")
    killed = tmp_path / "killed"
    command = client(server, *train, "--out", str(killed))
    log = killed / "train_log.jsonl"
    kill_when(command, tmp_path / "cache", lambda: in_stage_two(log))
    assert not (killed / "adapter_model.safetensors").exists()
    run(command, tmp_path / "cache")
    whole = tmp_path / "whole"
    assert files(killed, "adapter_config.json") == files(whole, "adapter_config.json")
    # The same tensors and metadata; the safetensors header orders its metadata keys by a hash
    # seeded per process, so the files' bytes may differ there and only there.
    got, want = (safetensors_content(d / "adapter_model.safetensors") for d in (killed, whole))
    assert got[1] == want[1] and got[0].keys() == want[0].keys()
    for name, tensor in want[0].items():
        assert torch.equal(got[0][name], tensor), name


def safetensors_content(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


HOLD_SESSIONS = """
import sys, time
from data_owner_client.client import PemaClient
client = PemaClient(sys.argv[1])
for _ in range(int(sys.argv[2])):
    client.open_session([[5, 6, 7]])
print("open", flush=True)
time.sleep(600)
"""


def test_a_client_killed_with_its_sessions_open_does_not_lock_its_key_out(tmp_path):
    """A client that dies holding the key's 16 sessions: the key's next `generate` reclaims
    idle ones (after `Retry-After`: 10 s here) instead of failing until they expire."""
    server = TinyServer(free_port(), tmp_path / "log", {"PEMA_SESSION_RECLAIM_S": "10"})
    server.start()
    try:
        server.wait_ready()
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_SESSIONS, server.url, "16"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with PemaClient(server.url, retries=0) as pema, pytest.raises(ServerError) as refused:
            pema.open_session([[5]])  # all 16 are still in the key's cap
        assert refused.value.status == 429 and refused.value.code == "too_many_sessions"
        started = time.monotonic()
        run(client(server, "generate", "--prompt", "w5 w6", "--max-new-tokens", "4",
                   "--no-progress"), tmp_path / "cache")  # fmt: skip
        assert time.monotonic() - started < 60  # not the 600 s of the sessions' TTL
    finally:
        server.kill()
