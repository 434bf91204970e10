"""Load with small numbers: keys × concurrent sessions and represent traffic against a real
server whose KV-cache bound is far below what the sessions would take: no 5xx, every route
served, sessions evicted, and the cache never beyond its bound (bench/load.py, the big version)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from plm_owner_server.auth import hash_key
from tests.tiny_server import TinyServer
from tests.uvicorn_server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import load  # noqa: E402

KEYS = ["pema_load-a", "pema_load-b"]


@pytest.mark.slow
def test_load_gives_no_5xx_and_keeps_the_cache_bound(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("".join(f"{hash_key(k)} k{i}\n" for i, k in enumerate(KEYS)))
    env = {"PEMA_API_KEYS_FILE": str(keys_file), "PEMA_MAX_KV_CACHE_MIB": "1"}
    server = TinyServer(free_port(), tmp_path / "log", env)
    server.start()
    try:
        server.wait_ready()
        args = argparse.Namespace(sessions=3, rows=16, prompt=100, steps=12, seconds=6.0)
        results = load.load(server.url, KEYS, args)
    finally:
        server.kill()
    assert results["server_errors"] == 0, results["outcomes"]
    assert {"open", "step", "close", "represent"} <= results["latency"].keys()
    assert results["evicted"] > 0  # 6 sessions of 16 × 112 positions do not fit in 1 MiB
    assert 0 < results["kv_peak_mib"] <= 1.0
    assert not [o for o in results["outcomes"] if o.split()[1].startswith("5")]
