"""`pema-client generate` through the server versus in-process transformers greedy decoding.

    python bench/bench_generate.py [--quick] [--json PATH]

Starts `pema-server` as a real uvicorn subprocess on a free port and loads the same model into this
process. For each batch size the same prompts are decoded, alternately, by

- in-process ``model.generate`` (greedy, KV cache, exactly ``--new-tokens`` new tokens), and
- the client's :class:`Generator` over loopback HTTP with an adapter of the paper's rank mixed in at
  every step (constant λ = 0.9, so the adapter and the mixture run on every token), the served
  model's EOS ignored so both sides decode the same number of tokens.

Ratios are medians of adjacent pairs (tokens/s of the client ÷ tokens/s in-process), so drift of
the machine's speed cancels out. Wire bytes (request and response, bodies and headers) are counted
on the client's connection and divided by the generated tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import httpx
import torch
from bench_common import decoding_parser, left_padded, run_and_report, seconds

from data_owner_client.adapter import PemaAdapter, PemaConfig, load_adapter, save_adapter
from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES, Example, encode_prompt, load_examples
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from plm_owner_server.runner import ModelRunner

BATCHES = (1, 8)
GOAL = 0.9  # client tokens/s ÷ in-process tokens/s
TEMPLATE = TEMPLATES["translate"]


class WireCounter:
    """Bytes of every request and response on an httpx client: start line, headers, body."""

    def __init__(self) -> None:
        self.bytes = 0

    @staticmethod
    def _headers(headers: httpx.Headers) -> int:
        return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2

    def request(self, request: httpx.Request) -> None:
        line = len(request.method) + len(request.url.raw_path) + 12
        self.bytes += line + self._headers(request.headers) + len(request.content)

    def response(self, response: httpx.Response) -> None:
        response.read()
        self.bytes += 17 + self._headers(response.headers) + len(response.content)


def adapter_dir(served: ServedModel, folder: Path) -> Path:
    """A random adapter of the paper's rank, saved as a real adapter directory."""
    info = served.info
    config = PemaConfig(
        info.hidden_size, info.vocab_size, fingerprint=info.fingerprint, length_ratio=1.0
    )
    adapter = PemaAdapter.from_config(config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.B_pd.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return save_adapter(folder, adapter, config)


@torch.inference_mode()
def in_process(model: Any, tokenizer: Any, examples: list[Example], new_tokens: int) -> int:
    """transformers' greedy ``generate`` of exactly ``new_tokens`` per row; returns the count."""
    prompts = [encode_prompt(tokenizer, TEMPLATE, e.source) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return (out.shape[1] - width) * len(examples)


def bench_batch(
    runner: ModelRunner,
    generator: Generator,
    counter: WireCounter,
    examples: list[Example],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Interleaved timings of both sides on the same prompts."""
    samples: dict[str, list[float]] = {"in_process": [], "client": []}
    tokens = {"in_process": 0, "client": 0}

    def client_side() -> None:
        tokens["client"] = sum(g.tokens for g in generator.generate(examples))

    def baseline() -> None:
        tokens["in_process"] = in_process(runner.model, runner.tokenizer, examples, args.new_tokens)

    sides = {"in_process": baseline, "client": client_side}
    for fn in sides.values():  # warm-up
        fn()
    wire_before = counter.bytes
    client_runs = 0
    for i in range(args.repeats):
        for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
            samples[name].append(seconds(sides[name]))
            client_runs += name == "client"
    assert tokens["client"] == tokens["in_process"] == args.new_tokens * len(examples)
    per_run = tokens["client"]
    tps = {k: [per_run / s for s in v] for k, v in samples.items()}
    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
        "ratio": statistics.median(
            c / b for c, b in zip(tps["client"], tps["in_process"], strict=True)
        ),
        "wire_bytes_per_token": (counter.bytes - wire_before) / (client_runs * per_run),
        "samples_s": samples,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| batch | in-process generate (tok/s) | pema-client generate (tok/s) | ratio | goal "
        "| wire bytes per generated token |",
        "|---|---|---|---|---|---|",
    ]
    for batch, r in results["batches"].items():
        met = "✓" if r["ratio"] >= GOAL else "✗"
        tps = r["tokens_per_s"]
        lines.append(
            f"| {batch} | {tps['in_process']:.1f} | {tps['client']:.1f} | {r['ratio']:.3f} "
            f"| ≥ {GOAL} {met} | {r['wire_bytes_per_token']:,.0f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, runner: ModelRunner, url: str, tmp: Path) -> dict[str, Any]:
    examples = load_examples(args.data, "en", "du", limit=max(BATCHES))
    counter = WireCounter()
    hooks = {"request": [counter.request], "response": [counter.response]}
    http = httpx.Client(base_url=url, timeout=600, event_hooks=hooks)
    with PemaClient(http=http) as client:
        served = ServedModel.fetch(client, cache_dir=tmp / "cache")
        # Ignore EOS so that both sides decode exactly the same number of tokens.
        served = dataclasses.replace(
            served, info=served.info.model_copy(update={"eos_token_ids": []})
        )
        adapter, adapter_config = load_adapter(
            adapter_dir(served, tmp / "adapter"),
            fingerprint=served.info.fingerprint,
            head=served.head,
        )
        results: dict[str, Any] = {"batches": {}, "new_tokens": args.new_tokens}
        for batch in BATCHES:
            config = GenerationConfig(
                max_new_tokens=args.new_tokens,
                lambda_max=0.9,
                schedule="constant",
                batch_size=batch,
            )
            generator = Generator(client, served, config, TEMPLATE, adapter, adapter_config)
            results["batches"][batch] = bench_batch(
                runner, generator, counter, examples[:batch], args
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = decoding_parser(__doc__, 32, "tokens decoded per row")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    run_and_report(
        args,
        lambda runner, url, tmp: run(args, runner, url, tmp),
        table,
        f"{args.repeats} repeats, {args.new_tokens} new tokens per row",
    )


if __name__ == "__main__":
    main()
