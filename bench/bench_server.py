"""The server over loopback HTTP versus the same work in-process, measured in one run.

    python bench/bench_server.py [--quick] [--json PATH]

Starts `pema-server` as a real uvicorn subprocess on a free port and loads the same model into this
process. Baseline and server measurements are interleaved and repeated; every ratio is the median
of the ratios of adjacent pairs, so drift of the machine's speed cancels out.

1. ``/v1/represent`` throughput (PemaClient, response decoded) versus ``ModelRunner.represent``
   on the same model (no wire encoding), ratio = HTTP throughput ÷ in-process throughput.
2. Greedy decoding per-step latency: ``POST /v1/sessions/{id}/step`` asking for top-1 logits
   versus ``model(input_ids=next, past_key_values=cache, use_cache=True)`` plus argmax, ratio =
   HTTP ÷ in-process.
3. Response bytes per position: float16 hidden states versus float32 hidden + full logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from bench_common import DATA, run_and_report, seconds
from transformers import DynamicCache

from data_owner_client.client import PemaClient
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from shared.codec import pack
from shared.protocol import MSGPACK, HiddenDType, LogitsMode, RepresentRequest

SEQ_LEN = 128  # tokens per sequence for /v1/represent
BATCHES = (1, 8, 32)
PROMPT_LEN = 64  # prompt tokens per row of a decoding session
STEP_BATCHES = (1, 8)
WIRE_DTYPES: tuple[HiddenDType, ...] = ("float16", "float32")
THROUGHPUT_GOAL = 0.95  # HTTP ÷ in-process throughput at the largest batch
STEP_GOAL = 1.1  # HTTP ÷ in-process step latency


def token_windows(
    path: Path, field: str, tokenizer: Any, length: int, count: int
) -> list[list[int]]:
    """``count`` windows of exactly ``length`` tokens of running text from a JSONL file."""
    ids: list[int] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            ids += tokenizer(json.loads(line)[field] + "\n")["input_ids"]
            if len(ids) >= length * count:
                return [ids[i * length : (i + 1) * length] for i in range(count)]
    raise ValueError(f"{path} holds fewer than {length * count} tokens of {field!r}")


def paired(samples: dict[str, list[float]], base: str, other: str) -> float:
    """Median of the ratios ``base ÷ other`` of interleaved samples, pair by pair."""
    return statistics.median(a / b for a, b in zip(samples[base], samples[other], strict=True))


def bench_represent(
    runner: ModelRunner, client: PemaClient, rows: list[list[int]], repeats: int
) -> dict[str, Any]:
    """Seconds per batch in-process and per wire dtype over HTTP; ratios of throughput."""
    budget = Settings().max_batch_tokens
    sides: dict[str, Callable[[], object]] = {
        "in_process": lambda: runner.represent(rows, [0] * len(rows), budget)
    }
    for dtype in WIRE_DTYPES:
        sides[dtype] = lambda d=dtype: client.represent(rows, dtype=d)
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up
        fn()
    for i in range(repeats):
        # Alternate the order so that neither side always runs right after the other.
        for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
            samples[name].append(seconds(sides[name]))
    tokens = sum(map(len, rows))
    return {
        "tokens": tokens,
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in samples.items()},
        "ratio": {d: paired(samples, "in_process", d) for d in WIRE_DTYPES},
        "samples_s": samples,
    }


@torch.inference_mode()
def greedy_in_process(model: Any, prompts: list[list[int]]) -> Iterator[None]:
    """A KV-cached greedy loop with plain transformers; each ``next()`` is one step."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor(prompts), past_key_values=cache, use_cache=True)
    yield  # prefilled
    while True:
        # The next tokens are each row's argmax, fed back through the cache.
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        yield


def greedy_http(client: PemaClient, prompts: list[list[int]]) -> Iterator[None]:
    """The same greedy loop through a server session that answers with top-1 logits."""
    session, _, top = client.open_session(prompts, dtype="float16", logits=1)
    try:
        yield  # prefilled
        while True:
            _, top = client.step(session, top[1][:, 0].tolist(), logits=1)  # type: ignore[index]
            yield
    finally:
        client.close_session(session)


def bench_step(
    model: Any, client: PemaClient, prompts: list[list[int]], steps: int, repeats: int
) -> dict[str, Any]:
    """Per-step latency of both loops advanced in lockstep, so each HTTP step has a twin."""
    samples: dict[str, list[float]] = {"in_process": [], "http": []}
    for _ in range(repeats):
        loops = {
            "in_process": greedy_in_process(model, prompts),
            "http": greedy_http(client, prompts),
        }
        for loop in loops.values():  # prefill and one warm-up step, untimed
            next(loop), next(loop)
        for _ in range(steps):
            for name, loop in loops.items():
                samples[name].append(seconds(lambda loop=loop: next(loop)))
        for loop in loops.values():
            loop.close()
    return {
        "step_s": {k: statistics.median(v) for k, v in samples.items()},
        "ratio": paired(samples, "http", "in_process"),
        "samples_s": samples,
    }


def body_bytes(url: str, rows: list[list[int]], dtype: HiddenDType, logits: LogitsMode) -> int:
    """Size of the msgpack response body of one ``/v1/represent`` call."""
    request = RepresentRequest(sequences=rows, dtype=dtype, logits=logits)
    headers = {"content-type": MSGPACK, "accept": MSGPACK}
    response = httpx.post(
        f"{url}/v1/represent", content=pack(request), headers=headers, timeout=600
    )
    response.raise_for_status()
    return len(response.content)


def bench_bytes(url: str, windows: list[list[int]]) -> dict[str, Any]:
    """Response bytes per position: fp16 hidden only versus fp32 hidden plus full logits."""
    hidden = body_bytes(url, windows[:8], "float16", "none") / (8 * SEQ_LEN)
    full = body_bytes(url, windows[:1], "float32", "full") / SEQ_LEN
    return {"fp16_hidden": hidden, "fp32_full_logits": full, "ratio": full / hidden}


def _goal(value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return f"{'≥' if at_least else '≤'} {goal} {'✓' if met else '✗'}"


def table(results: dict[str, Any]) -> str:
    """The markdown table of all measurements."""
    lines = [
        "| measurement | in-process | server over HTTP | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for batch, r in results["represent"].items():
        tps = r["tokens_per_s"]
        for dtype in WIRE_DTYPES:
            goal = _goal(r["ratio"][dtype], THROUGHPUT_GOAL, True) if batch == max(BATCHES) else ""
            lines.append(
                f"| represent, batch {batch}×{SEQ_LEN} tok, {dtype} (tok/s) "
                f"| {tps['in_process']:.0f} | {tps[dtype]:.0f} | {r['ratio'][dtype]:.3f} | {goal} |"
            )
    for batch, r in results["step"].items():
        ms = {k: v * 1e3 for k, v in r["step_s"].items()}
        lines.append(
            f"| greedy step, batch {batch}, {PROMPT_LEN}-tok prompt (median ms) "
            f"| {ms['in_process']:.1f} | {ms['http']:.1f} | {r['ratio']:.3f} "
            f"| {_goal(r['ratio'], STEP_GOAL, False)} |"
        )
    b = results["bytes_per_token"]
    lines.append(f"| wire bytes/token, float16 hidden | | {b['fp16_hidden']:,.0f} | | |")
    lines.append(
        f"| wire bytes/token, float32 hidden + full logits | | {b['fp32_full_logits']:,.0f} "
        f"| {b['ratio']:.0f}× the float16 body | |"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace, runner: ModelRunner, url: str) -> dict[str, Any]:
    """All three measurements against one running server."""
    windows = token_windows(args.data, args.field, runner.tokenizer, SEQ_LEN, max(BATCHES))
    prompts = [w[:PROMPT_LEN] for w in windows]
    results: dict[str, Any] = {"represent": {}, "step": {}}
    with PemaClient(url) as client:
        for batch in BATCHES:
            results["represent"][batch] = bench_represent(
                runner, client, windows[:batch], args.repeats
            )
        for batch in STEP_BATCHES:
            results["step"][batch] = bench_step(
                runner.model, client, prompts[:batch], args.steps, args.repeats
            )
    results["bytes_per_token"] = bench_bytes(url, windows)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 8 steps")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--steps", type=int, default=32, help="greedy steps per session")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of this process and of the server (default: torch's)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL file of real text")
    parser.add_argument("--field", default="en", help="text field of --data")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 8
    run_and_report(
        args,
        lambda runner, url, tmp: run(args, runner, url),
        table,
        f"{args.repeats} repeats, {args.steps} steps",
    )


if __name__ == "__main__":
    main()
