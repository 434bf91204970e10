"""Load: K keys × S concurrent sessions, plus `/v1/represent` traffic, against a real server.

    python bench/load.py [--keys 4] [--sessions 4] [--seconds 90] [--max-kv-cache-mib 64]

Starts `pema-server` (embedded SmolLM2) with a keys file and a small KV-cache bound, then runs, for
``--seconds``: per key, ``--sessions`` loops that open a session (``--rows`` prompts of
``--prompt`` tokens), step it ``--steps`` times and close it, and one loop of `/v1/represent`
calls. Reports requests by route and status (4xx by error code; goal: no 5xx), p50/p99 latency per
route, sessions evicted, and the server's peak RSS against its model + KV bound (sampled from
/proc every 100 ms; goal: the KV part stays within the bound however many sessions are opened).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import msgpack
from bench_common import machine, running_server

from plm_owner_server.auth import hash_key, new_key

MSGPACK = "application/x-msgpack"
ROUTES = ("open", "step", "close", "represent")


class Tally:
    """Latency and outcome of every request, by route."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (route, "200" or "429 code")

    def record(self, route: str, response: httpx.Response, seconds: float) -> None:
        self.seconds[route].append(seconds)
        outcome = str(response.status_code)
        if response.status_code >= 400:
            try:
                outcome += " " + response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
        self.outcomes[route, outcome] += 1


def random_rows(rng: random.Random, rows: int, tokens: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(rows)]


async def call(
    http: httpx.AsyncClient, tally: Tally, route: str, method: str, path: str, body: Any = None
) -> httpx.Response:
    content = msgpack.packb(body) if body is not None else None
    headers = {"content-type": MSGPACK, "accept": MSGPACK} if body is not None else {}
    start = time.perf_counter()
    response = await http.request(method, path, content=content, headers=headers)
    tally.record(route, response, time.perf_counter() - start)
    return response


async def session_loop(
    http: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, rng: random.Random, end: float
) -> None:
    while time.monotonic() < end:
        prompts = random_rows(rng, args.rows, args.prompt, args.vocab)
        opened = await call(http, tally, "open", "POST", "/v1/sessions", {"sequences": prompts})
        if opened.status_code != 201:
            await asyncio.sleep(0.2)  # over a cap: back off
            continue
        session = msgpack.unpackb(opened.content)["session_id"]
        for _ in range(args.steps):
            tokens = random_rows(rng, 1, args.rows, args.vocab)[0]
            step = await call(
                http, tally, "step", "POST", f"/v1/sessions/{session}/step", {"tokens": tokens}
            )
            if step.status_code != 200:  # evicted (404): open another
                break
        await call(http, tally, "close", "DELETE", f"/v1/sessions/{session}")


async def represent_loop(
    http: httpx.AsyncClient, tally: Tally, args: argparse.Namespace, rng: random.Random, end: float
) -> None:
    while time.monotonic() < end:
        body = {"sequences": random_rows(rng, 4, args.prompt, args.vocab), "dtype": "float16"}
        await call(http, tally, "represent", "POST", "/v1/represent", body)


async def drive(url: str, keys: list[str], args: argparse.Namespace) -> Tally:
    tally, end = Tally(), time.monotonic() + args.seconds
    timeout = httpx.Timeout(120.0)
    clients = [
        httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {k}"}, timeout=timeout)
        for k in keys
    ]
    try:
        loops = []
        for i, http in enumerate(clients):
            rng = random.Random(i)
            loops += [session_loop(http, tally, args, rng, end) for _ in range(args.sessions)]
            loops.append(represent_loop(http, tally, args, rng, end))
        await asyncio.gather(*loops)
    finally:
        for http in clients:
            await http.aclose()
    return tally


def memory_mib(url: str) -> tuple[float, float]:
    """The server's resident memory and its sessions' KV cache, from its own /metrics."""
    text = httpx.get(f"{url}/metrics").text
    rss, kv = (
        metric(text, name) / 2**20
        for name in ("process_resident_memory_bytes", "pema_kv_cache_bytes")
    )
    return rss, kv


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def load(url: str, keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run the load against the server at ``url``; the figures."""
    auth = {"authorization": f"Bearer {keys[0]}"}
    args.vocab = httpx.get(f"{url}/v1/model", headers=auth).json()["vocab_size"]
    idle = memory_mib(url)
    peak, stop = [idle], threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak.append(memory_mib(url))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        tally = asyncio.run(drive(url, keys, args))
    finally:
        stop.set()
        sampler.join()
    metrics = httpx.get(f"{url}/metrics").text
    latency = {
        route: {
            "requests": len(s),
            "p50_ms": 1e3 * statistics.median(s),
            "p99_ms": 1e3 * statistics.quantiles(s, n=100, method="inclusive")[98]
            if len(s) > 1
            else 1e3 * s[0],
        }
        for route, s in tally.seconds.items()
    }
    return {
        "latency": latency,
        "outcomes": {
            f"{route} {outcome}": n for (route, outcome), n in sorted(tally.outcomes.items())
        },
        "server_errors": sum(n for (_, o), n in tally.outcomes.items() if o.startswith("5")),
        "evicted": metric(metrics, "pema_sessions_evicted_total"),
        "rss_idle_mib": idle[0],
        "rss_peak_mib": max(rss for rss, _ in peak),
        "kv_peak_mib": max(kv for _, kv in peak),
    }


def table(results: dict[str, Any], bound_mib: int) -> str:
    lines = ["| route | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for route in ROUTES:
        if r := results["latency"].get(route):
            lines.append(f"| {route} | {r['requests']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", "| outcome | count |", "|---|---:|"]
    lines += [f"| {k} | {n} |" for k, n in results["outcomes"].items()]
    grown = results["rss_peak_mib"] - results["rss_idle_mib"]
    lines += [
        "",
        f"5xx: {results['server_errors']:.0f} (goal 0); "
        f"sessions evicted: {results['evicted']:.0f}; "
        f"server RSS {results['rss_idle_mib']:.0f} MiB idle (model loaded), peak "
        f"{results['rss_peak_mib']:.0f} MiB: +{grown:.0f} MiB under load; sessions' KV cache at "
        f"most {results['kv_peak_mib']:.1f} MiB against a bound of {bound_mib} MiB",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions per key")
    p.add_argument("--rows", type=int, default=4, help="prompts per session")
    p.add_argument("--prompt", type=int, default=48, help="tokens per prompt")
    p.add_argument("--steps", type=int, default=24, help="steps per session")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--max-kv-cache-mib", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    keys = [new_key() for _ in range(args.keys)]
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys"
        keys_file.write_text("".join(f"{hash_key(k)} load-{i}\n" for i, k in enumerate(keys)))
        flags = [
            "--api-keys-file",
            str(keys_file),
            "--max-kv-cache-mib",
            str(args.max_kv_cache_mib),
        ]
        with running_server(args.threads, Path(tmp) / "log", flags=flags) as url:
            results = load(url, keys, args)
    results["machine"] = machine(args.threads)
    print(table(results, args.max_kv_cache_mib))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
