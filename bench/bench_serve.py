"""`pema-client serve` under concurrent streaming clients versus one `pema-client generate` batch.

    python bench/bench_serve.py [--quick] [--json PATH]

Starts `pema-server` (the embedded SmolLM2 unless PEMA_MODEL says otherwise) and
`pema-client serve` as real uvicorn subprocesses, with a sequence adapter (the default kind; its
weights random, so the mixture runs on every token). The same 8 WMT22 prompts are decoded,
alternately, by

- one `pema-client generate` batch of 8 (its :class:`Generator`, in this process), and
- 8 threads of the official `openai` package, each streaming one prompt's completion from
  `serve` at the same moment, greedy, with the same settings (so each decodes the same tokens).

Reported: tokens/s of each side (all new tokens ÷ wall time from the first request to the last
token), the ratio as the median of adjacent pairs, and the streams' time to first token (from
the moment all 8 are sent, and for one client alone on an idle service).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import torch
from bench_common import decoding_parser, free_port, run_and_report, seconds

from data_owner_client.adapter import SequenceConfig, build_adapter, load_adapter, save_adapter
from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES, load_examples, render_prompt
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from plm_owner_server.runner import ModelRunner

CLIENTS = 8
GOAL = 0.9  # serve tokens/s ÷ generate tokens/s
TEMPLATE = TEMPLATES["translate"]


def adapter_dir(served: ServedModel, folder: Path) -> Path:
    info = served.info
    assert served.head is not None
    config = SequenceConfig(
        info.hidden_size,
        info.vocab_size,
        fingerprint=info.fingerprint,
        template=TEMPLATE,
        length_ratio=1.0,
        lambda_max=0.5,
        schedule="constant",
        no_repeat_ngram=0,  # as the runs before kinds had their own defaults
        num_beams=1,  # serve decodes one hypothesis: the batch must decode the same tokens
    )
    adapter = build_adapter(config, served.head, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.output.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return save_adapter(folder, adapter, config)


class Service:
    """`pema-client serve` as a subprocess."""

    def __init__(self, server: str, adapter: Path, tmp: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "data_owner_client", "serve", "--server", server,
                f"--adapter=bench={adapter}", "--port", str(self.port)]  # fmt: skip
        env = {"PEMA_CLIENT_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": str(threads)}
        self.log = tmp / "serve.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.api = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.api.models.list()
                return
            except openai.APIConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self.log.read_text()[-3000:]) from None
                time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def stream(api: openai.OpenAI, prompt: str, new_tokens: int, start: float) -> tuple[int, float]:
    """One streamed completion: (new tokens, seconds from ``start`` to its first text)."""
    first = None
    tokens = 0
    chunks = api.completions.create(
        model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in chunks:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else float("nan")


def run(args: argparse.Namespace, runner: ModelRunner, url: str, tmp: Path) -> dict[str, Any]:
    examples = load_examples(args.data, "en", "du", limit=CLIENTS)
    prompts = [render_prompt(TEMPLATE, e.source) for e in examples]
    with PemaClient(url) as client:
        served = ServedModel.fetch(client, cache_dir=tmp / "cache")
        folder = adapter_dir(served, tmp / "adapter")
        adapter, adapter_config = load_adapter(
            folder, fingerprint=served.info.fingerprint, head=served.head
        )
        config = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=CLIENTS)
        generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
        service = Service(url, folder, tmp, args.threads)
        pool = ThreadPoolExecutor(CLIENTS)
        tokens: dict[str, int] = {}
        first_token: list[float] = []
        try:

            def batch() -> None:
                tokens["generate"] = sum(g.tokens for g in generator.generate(examples))

            def streams() -> None:
                start = time.perf_counter()
                barrier = threading.Barrier(CLIENTS)

                def one(prompt: str) -> tuple[int, float]:
                    barrier.wait()
                    return stream(service.api, prompt, args.new_tokens, start)

                done = list(pool.map(one, prompts))
                tokens["serve"] = sum(t for t, _ in done)
                first_token.extend(f for _, f in done)

            sides = {"generate": batch, "serve": streams}
            for fn in sides.values():  # warm-up
                fn()
            first_token.clear()
            samples: dict[str, list[float]] = {name: [] for name in sides}
            for i in range(args.repeats):
                for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
                    samples[name].append(seconds(sides[name]))
            alone = [
                stream(service.api, prompts[0], args.new_tokens, time.perf_counter())[1]
                for _ in range(args.repeats)
            ]
        finally:
            pool.shutdown()
            service.close()
    assert tokens["serve"] == tokens["generate"], tokens  # the same greedy outputs
    tps = {name: [tokens[name] / s for s in runs] for name, runs in samples.items()}
    return {
        "clients": CLIENTS,
        "new_tokens": args.new_tokens,
        "tokens_per_run": tokens["generate"],
        "tokens_per_s": {name: statistics.median(v) for name, v in tps.items()},
        "ratio": statistics.median(
            s / g for s, g in zip(tps["serve"], tps["generate"], strict=True)
        ),
        "first_token_s": {
            "p50": statistics.median(first_token),
            "max": max(first_token),
            "alone": statistics.median(alone),
        },
        "samples_s": samples,
    }


def table(r: dict[str, Any]) -> str:
    met = "✓" if r["ratio"] >= GOAL else "✗"
    tps, ttft = r["tokens_per_s"], r["first_token_s"]
    return "\n".join(
        [
            "| clients | generate batch (tok/s) | serve, streaming clients (tok/s) | ratio | goal "
            "| time to first token p50 / max | one client alone |",
            "|---|---|---|---|---|---|---|",
            f"| {r['clients']} | {tps['generate']:.1f} | {tps['serve']:.1f} | {r['ratio']:.3f} "
            f"| ≥ {GOAL} {met} | {ttft['p50'] * 1000:.0f} ms / {ttft['max'] * 1000:.0f} ms "
            f"| {ttft['alone'] * 1000:.0f} ms |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = decoding_parser(__doc__, 48, "most new tokens per prompt")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    run_and_report(
        args,
        lambda runner, url, tmp: run(args, runner, url, tmp),
        table,
        f"{CLIENTS} clients, {args.repeats} repeats, at most {args.new_tokens} new tokens each",
    )


if __name__ == "__main__":
    main()
