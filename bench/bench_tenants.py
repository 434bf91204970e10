"""Many data owners at once, against one real `pema-server`, measured in one run.

    python bench/bench_tenants.py [--quick] [--json PATH]

1. Aggregate decoding tokens/s of N concurrent clients, each with its own API key and its own
   1-row session, against one client decoding the same N rows in one session (N = 1, 4, 16).
   Greedy steps asking for top-1 logits, 64-token prompts of real text. The scheduler puts the
   steps of all sessions into shared passes; goal: ≥ 0.8× at N = 16.
2. Step latency (p50, p99) of a 1-row client while another key's 64-row session steps (opened
   before the measurement), against the same client alone; goal: ≤ 2×.
3. The same client's step latency while another key opens 64-row sessions of 64-token prompts
   one after another (chunked prefill), against the client alone; goal: p99 ≤ 2×.
4. Memory build: tokens/s of `build_memory` (teacher-forced, float16, the CLI's defaults) through
   the server, against `ModelRunner.represent` of the same sequences in the same batches in this
   process, answers cast to float16; goal: ≥ 0.8×.

Runs are interleaved and repeated; ratios are medians of the ratios of adjacent pairs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from bench_common import DATA, machine, publish, running_server
from bench_server import token_windows
from safetensors.torch import load_file
from transformers import AutoTokenizer

from data_owner_client.client import PemaClient
from data_owner_client.data import Example, load_examples
from data_owner_client.memory import Memory, build_memory
from plm_owner_server.auth import hash_key, new_key
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings

PROMPT_LEN = 64
CLIENTS = (1, 4, 16)
BIG_SESSION_ROWS = 64
BUILD_EXAMPLES = 256
BUILD_BATCH = 32  # examples per request: build_memory's default
AGGREGATE_GOAL = 0.8
LATENCY_GOAL = 2.0
BUILD_GOAL = 0.8
PARTS = ("aggregate", "latency", "prefill", "build")


def decode(url: str, key: str, prompts: Sequence[list[int]], steps: int, ready: Any) -> list[float]:
    """Open a session, wait for ``ready``, then ``steps`` greedy steps; each step's seconds."""
    with PemaClient(url, api_key=key) as client:
        session, _, top = client.open_session(prompts, dtype="float16", logits=1)
        ready()
        times = []
        try:
            for _ in range(steps):
                start = time.perf_counter()
                _, top = client.step(session, top[1][:, 0].tolist(), logits=1)  # type: ignore[index]
                times.append(time.perf_counter() - start)
        finally:
            client.close_session(session)
    return times


def concurrent_tokens_s(url: str, keys: list[str], prompts: list[list[int]], steps: int) -> float:
    """N clients, one row each, stepping at once; tokens/s from the first to the last step."""
    barrier = threading.Barrier(len(prompts) + 1)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(decode, url, key, [prompt], steps, barrier.wait)
            for key, prompt in zip(keys, prompts, strict=False)
        ]
        barrier.wait()
        start = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - start
    return len(prompts) * steps / wall


def batched_tokens_s(url: str, key: str, prompts: list[list[int]], steps: int) -> float:
    times = decode(url, key, prompts, steps, lambda: None)
    return len(prompts) * steps / sum(times)


def bench_aggregate(
    url: str, keys: list[str], prompts: list[list[int]], steps: int, repeats: int
) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for n in CLIENTS:
        together, batched = [], []
        for _ in range(repeats):
            together.append(concurrent_tokens_s(url, keys[:n], prompts[:n], steps))
            batched.append(batched_tokens_s(url, keys[0], prompts[:n], steps))
        out[n] = {
            "clients_tokens_s": statistics.median(together),
            "one_session_tokens_s": statistics.median(batched),
            "ratio": statistics.median(t / b for t, b in zip(together, batched, strict=True)),
        }
        print(f"  N={n}: {out[n]}", flush=True)
    return out


def big_session(
    url: str, key: str, prompts: list[list[int]], opened: threading.Event, stop: threading.Event
) -> None:
    """One session of all ``prompts`` that steps until ``stop`` (reopened at the step limit)."""
    with PemaClient(url, api_key=key) as client:
        limit = client.model_info().limits.max_new_tokens
        while not stop.is_set():
            session, _, top = client.open_session(prompts, dtype="float16", logits=1)
            opened.set()
            for _ in range(limit):
                if stop.is_set():
                    break
                _, top = client.step(session, top[1][:, 0].tolist(), logits=1)  # type: ignore[index]
            client.close_session(session)


def bench_latency(
    url: str, keys: list[str], prompts: list[list[int]], steps: int, repeats: int
) -> dict[str, Any]:
    """The 1-row client's step latencies alone and next to a 64-row session of another key."""
    alone: list[float] = []
    loaded: list[float] = []
    for _ in range(repeats):
        alone += decode(url, keys[0], prompts[:1], steps, lambda: None)
        opened, stop = threading.Event(), threading.Event()
        with ThreadPoolExecutor(1) as pool:
            big = prompts[:BIG_SESSION_ROWS]
            background = pool.submit(big_session, url, keys[1], big, opened, stop)
            opened.wait()
            time.sleep(1.0)  # the big session is stepping (its prefill is not measured)
            loaded += decode(url, keys[0], prompts[:1], steps, lambda: None)
            stop.set()
            background.result()
    return _percentiles(alone, loaded)


def opener(url: str, key: str, prompts: list[list[int]], stop: threading.Event) -> list[float]:
    """Open and close sessions of all ``prompts`` until ``stop``; each opening's seconds."""
    times = []
    with PemaClient(url, api_key=key) as client:
        while not stop.is_set():
            start = time.perf_counter()
            session, _, _ = client.open_session(prompts, dtype="float16")
            times.append(time.perf_counter() - start)
            client.close_session(session)
    return times


def bench_prefill(
    url: str, keys: list[str], prompts: list[list[int]], steps: int, repeats: int
) -> dict[str, Any]:
    """The 1-row client's step latencies alone and while another key opens 64-row sessions of
    64-token prompts, one after another (each a prefill of 4,096 tokens)."""
    alone: list[float] = []
    loaded: list[float] = []
    openings: list[float] = []
    for _ in range(repeats):
        alone += decode(url, keys[0], prompts[:1], steps, lambda: None)
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            background = pool.submit(opener, url, keys[1], prompts[:BIG_SESSION_ROWS], stop)
            time.sleep(0.5)  # the first opening is under way
            loaded += decode(url, keys[0], prompts[:1], steps, lambda: None)
            stop.set()
            openings += background.result()
    result = {
        **_percentiles(alone, loaded),
        "openings": len(openings),
        "opening_s": statistics.median(openings),
    }
    print(f"  steps during openings: {result}", flush=True)
    return result


def _percentiles(alone: list[float], loaded: list[float]) -> dict[str, Any]:
    def pct(samples: list[float], q: int) -> float:
        return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]

    return {
        "alone_s": {"p50": pct(alone, 50), "p99": pct(alone, 99), "mean": statistics.mean(alone)},
        "loaded_s": {
            "p50": pct(loaded, 50),
            "p99": pct(loaded, 99),
            "mean": statistics.mean(loaded),
        },
        "p50_ratio": pct(loaded, 50) / pct(alone, 50),
        "p99_ratio": pct(loaded, 99) / pct(alone, 99),
        "mean_ratio": statistics.mean(loaded) / statistics.mean(alone),
    }


def memory_sequences(memory: Memory) -> list[list[int]]:
    """The sequences a teacher-forced memory was built from (every position is stored)."""
    out: list[list[int]] = []
    for shard in memory.manifest.shards:
        tensors = load_file(memory.path / shard.file)
        tokens, offsets = tensors["tokens"].tolist(), tensors["offsets"].tolist()
        out += [tokens[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    return out


def bench_build(
    url: str, key: str, runner: ModelRunner, examples: list[Example], tmp: Path, repeats: int
) -> dict[str, Any]:
    """Memory-build tokens/s through the server against the same forward passes in process."""
    tokenizer = runner.tokenizer
    build, local = [], []
    for r in range(repeats):
        with PemaClient(url, api_key=key) as client:
            start = time.perf_counter()
            memory = build_memory(
                client,
                tokenizer,
                examples,
                tmp / f"memory-{r}",
                template="translate",
                progress=False,
            )
            build_s = time.perf_counter() - start
        rows = memory_sequences(memory)
        tokens = sum(map(len, rows))
        start = time.perf_counter()
        for lo in range(0, len(rows), BUILD_BATCH):
            batch = rows[lo : lo + BUILD_BATCH]
            [h.to(torch.float16) for h in runner.represent(batch, [0] * len(batch), 16384)]
        local_s = time.perf_counter() - start
        build.append(tokens / build_s)
        local.append(tokens / local_s)
    result = {
        "build_tokens_s": statistics.median(build),
        "in_process_tokens_s": statistics.median(local),
        "ratio": statistics.median(b / i for b, i in zip(build, local, strict=True)),
    }
    print(f"  memory build: {result}", flush=True)
    return result


def _goal(value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return f"{'≥' if at_least else '≤'} {goal:g} {'met' if met else 'missed'}"


def table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "aggregate" in results:
        lines += _aggregate_table(results["aggregate"])
    if "latency" in results:
        lines += _latency_table(
            results["latency"], f"next to a {BIG_SESSION_ROWS}-row session of another key"
        )
    if "prefill" in results:
        p = results["prefill"]
        lines += [f"Openings meanwhile: {p['openings']}, {p['opening_s']:.1f} s each (median).", ""]
        lines += _latency_table(
            results["prefill"],
            f"while another key opens {BIG_SESSION_ROWS} × {PROMPT_LEN}-token sessions",
        )
    if "build" in results:
        lines += _build_table(results["build"])
    return "\n".join(lines)


def _aggregate_table(aggregate: dict[int, dict[str, Any]]) -> list[str]:
    lines = [
        "| N | N clients, 1 row each (tokens/s) | 1 client, N rows (tokens/s) | ratio | goal |",
        "|---:|---:|---:|---:|---|",
    ]
    for n, r in aggregate.items():
        goal = _goal(r["ratio"], AGGREGATE_GOAL, True) if n == max(CLIENTS) else ""
        lines.append(
            f"| {n} | {r['clients_tokens_s']:.1f} | {r['one_session_tokens_s']:.1f} "
            f"| {r['ratio']:.2f}× | {goal} |"
        )
    return lines + [""]


def _latency_table(lat: dict[str, Any], loaded: str) -> list[str]:
    lines = [
        f"| 1-row client's step | alone | {loaded} | ratio | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for q in ("p50", "p99", "mean"):
        ratio = lat[f"{q}_ratio"]
        lines.append(
            f"| {q} | {lat['alone_s'][q] * 1e3:.0f} ms | {lat['loaded_s'][q] * 1e3:.0f} ms "
            f"| {ratio:.2f}× | {_goal(ratio, LATENCY_GOAL, False) if q != 'mean' else ''} |"
        )
    return lines + [""]


def _build_table(b: dict[str, Any]) -> list[str]:
    return [
        f"| memory build, {BUILD_EXAMPLES} WMT22 pairs | in process (tokens/s) "
        "| through the server (tokens/s) | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| teacher-forced, float16 | {b['in_process_tokens_s']:.0f} | {b['build_tokens_s']:.0f} "
        f"| {b['ratio']:.2f}× | {_goal(b['ratio'], BUILD_GOAL, True)} |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 4 steps")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    parser.add_argument("--steps", type=int, default=24, help="greedy steps per session")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="server's")
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL file of real text")
    parser.add_argument("--field", default="en", help="text field of --data")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="measure only these parts"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 4
    started = time.perf_counter()
    keys = [new_key() for _ in range(max(CLIENTS) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys"
        keys_file.write_text("".join(f"{hash_key(k)} tenant-{i}\n" for i, k in enumerate(keys)))
        flags = ["--api-keys-file", str(keys_file)]
        with running_server(args.threads, Path(tmp) / "log", flags=flags) as url:
            with PemaClient(url, api_key=keys[0]) as client:
                folder = client.download_tokenizer(Path(tmp) / "tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            rows = max(max(CLIENTS), BIG_SESSION_ROWS)
            prompts = token_windows(args.data, args.field, tokenizer, PROMPT_LEN, rows)
            results: dict[str, Any] = {}
            if "aggregate" in args.only:
                results["aggregate"] = bench_aggregate(url, keys, prompts, args.steps, args.repeats)
            if "latency" in args.only:
                results["latency"] = bench_latency(url, keys, prompts, 2 * args.steps, args.repeats)
            if "prefill" in args.only:
                results["prefill"] = bench_prefill(url, keys, prompts, 2 * args.steps, args.repeats)
            if "build" in args.only:
                torch.set_num_threads(args.threads)
                runner = ModelRunner.load(Settings())
                examples = load_examples(args.data, args.field, "du", limit=BUILD_EXAMPLES)
                results["build"] = bench_build(
                    url, keys[0], runner, examples, Path(tmp), args.repeats
                )
    results["machine"] = m = machine(args.threads)
    results["wall_s"] = time.perf_counter() - started
    header = (
        f"{m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, {args.threads} server threads; "
        f"{args.repeats} repeats, {args.steps} steps, {PROMPT_LEN}-token prompts; "
        f"{results['wall_s']:.0f} s"
    )
    publish(results, header, table(results), args.json)


if __name__ == "__main__":
    main()
