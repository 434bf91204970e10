"""`pema-client generate` through the server versus the same decoding in one process.

    python bench/bench_generate.py [--quick] [--kinds pema sequence] [--json PATH]

Starts `pema-server` as a real uvicorn subprocess on a free port and loads the same model into this
process. For each adapter kind (the paper's ``pema`` at rank 512 and the ``sequence`` side model,
both random, mixed in at every step with constant λ, one hypothesis) and each batch size the same
prompts are decoded, alternately, by

- the client's :class:`Generator` over loopback HTTP (``client``),
- the same :class:`Generator` on a client that calls the model runner of this process directly,
  with no server, scheduler or wire (``local``): the decoding itself, adapter and mixture
  included; the tokens must equal the client's,
- in-process transformers ``model.generate`` (greedy, KV cache, no adapter): the PLM alone's cost,

the served model's EOS ignored so all decode the same number of tokens. Ratios are medians of
adjacent pairs (tokens/s ÷ tokens/s), so drift of the machine's speed cancels out. Wire bytes
(request and response, bodies and headers) are counted on the client's connection and divided by
the generated tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from bench_common import decoding_parser, left_padded, run_and_report, seconds

from data_owner_client.adapter import (
    PemaConfig,
    SequenceConfig,
    build_adapter,
    load_adapter,
    save_adapter,
)
from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES, Example, encode_prompt, load_examples
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from plm_owner_server.backend import open_sessions
from plm_owner_server.kv import KVState
from plm_owner_server.runner import ModelRunner
from shared.codec import TORCH_DTYPES
from shared.protocol import HiddenDType, SessionStepRequest

BATCHES = (1, 8)
KINDS = ("pema", "sequence")
GOAL = 0.9  # client tokens/s ÷ local tokens/s
TEMPLATE = TEMPLATES["translate"]
SIDES = ("client", "local", "generate")


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


class LocalClient:
    """The session calls a :class:`Generator` makes, answered by a model runner in this process
    as the server would answer them (same runner methods, same dtypes), with no HTTP."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sessions: dict[str, KVState] = {}

    def _open(self, sequences: Sequence[Sequence[int]]) -> tuple[str, list[torch.Tensor]]:
        ((state, rows),) = open_sessions(self.runner, [sequences])
        session = secrets.token_hex(8)
        self.sessions[session] = state
        return session, rows

    def open_session(
        self, sequences: Sequence[Sequence[int]], dtype: HiddenDType = "float32"
    ) -> tuple[str, torch.Tensor, None]:
        session, rows = self._open(sequences)
        return session, torch.stack([h[-1] for h in rows]).to(TORCH_DTYPES[dtype]), None

    def open_reading(
        self, sequences: Sequence[Sequence[int]], dtype: HiddenDType = "float32"
    ) -> tuple[str, list[torch.Tensor]]:
        session, rows = self._open(sequences)
        return session, [h.to(TORCH_DTYPES[dtype]) for h in rows]

    def step(
        self,
        session_id: str,
        tokens: Sequence[int],
        rows: Sequence[int] | None = None,
        parents: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        state = self.sessions[session_id]
        request = SessionStepRequest(tokens=list(tokens), rows=rows, parents=parents)
        live = request.step_rows(state.rows)
        if parents is not None:
            state.select(live, parents)
        return self.runner.step_session(state, live, tokens), None

    def close_session(self, session_id: str) -> None:
        del self.sessions[session_id]


def adapter_dir(kind: str, served: ServedModel, folder: Path) -> Path:
    """A random adapter of the kind (the paper's rank for ``pema``), saved as a real adapter
    directory, with weights large enough to move the mixture."""
    info = served.info
    shape = (info.hidden_size, info.vocab_size)
    config: PemaConfig | SequenceConfig
    if kind == "pema":
        config = PemaConfig(*shape, fingerprint=info.fingerprint, length_ratio=1.0)
    else:
        config = SequenceConfig(
            *shape, fingerprint=info.fingerprint, template=TEMPLATE, length_ratio=1.0
        )
    adapter = build_adapter(config, served.head, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = adapter.B_pd if kind == "pema" else adapter.output.weight
        output.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return save_adapter(folder / kind, adapter, config)


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


def contestants(
    decoders: dict[str, Generator], runner: ModelRunner, examples: list[Example], new_tokens: int
) -> dict[str, Callable[[], list[list[int]]]]:
    """Each side as a function decoding ``examples``: its new tokens (their count for
    ``generate``)."""

    def decode(generator: Generator) -> list[list[int]]:
        return [g.token_ids for g in generator.generate(examples)]

    def plain() -> list[list[int]]:
        return [[in_process(runner.model, runner.tokenizer, examples, new_tokens)]]

    return {
        "client": lambda: decode(decoders["client"]),
        "local": lambda: decode(decoders["local"]),
        "generate": plain,
    }


def bench_batch(
    sides: dict[str, Callable[[], list[list[int]]]],
    counter: WireCounter,
    args: argparse.Namespace,
    per_run: int,
) -> dict[str, Any]:
    """Interleaved timings of every side on the same prompts (the order reversed every other
    repeat)."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    outputs = {name: fn() for name, fn in sides.items()}  # warm-up
    if outputs["client"] != outputs["local"]:
        raise AssertionError("the client decoded other tokens than the same decoding in process")
    wire_before, client_runs = counter.bytes, 0
    for i in range(args.repeats):
        for name in list(sides)[:: 1 if i % 2 == 0 else -1]:
            samples[name].append(seconds(sides[name]))
            client_runs += name == "client"
    tps = {k: [per_run / s for s in v] for k, v in samples.items()}

    def ratio(side: str, base: str) -> float:
        return statistics.median(c / b for c, b in zip(tps[side], tps[base], strict=True))

    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
        "ratio": ratio("client", "local"),
        "ratio_to_generate": ratio("client", "generate"),
        "local_to_generate": ratio("local", "generate"),
        "wire_bytes_per_token": (counter.bytes - wire_before) / (client_runs * per_run),
        "samples_s": samples,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| kind | batch | generate, no adapter (tok/s) | same decoding in process (tok/s) "
        "| pema-client generate (tok/s) | ÷ in process | goal | ÷ generate "
        "| wire bytes per token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, batches in results["kinds"].items():
        for batch, r in batches.items():
            met = "✓" if r["ratio"] >= GOAL else "✗"
            tps = r["tokens_per_s"]
            lines.append(
                f"| {kind} | {batch} | {tps['generate']:.1f} | {tps['local']:.1f} "
                f"| {tps['client']:.1f} | {r['ratio']:.3f} | ≥ {GOAL} {met} "
                f"| {r['ratio_to_generate']:.3f} | {r['wire_bytes_per_token']:,.0f} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, runner: ModelRunner, url: str, tmp: Path) -> dict[str, Any]:
    examples = load_examples(args.data, "en", "du", limit=max(BATCHES))
    counter = WireCounter()
    hooks = {"request": [counter.request], "response": [counter.response]}
    http = httpx.Client(base_url=url, timeout=600, event_hooks=hooks)
    local = LocalClient(runner)
    with PemaClient(http=http) as client:
        served = ServedModel.fetch(client, cache_dir=tmp / "cache")
        # Ignore EOS so that every side decodes exactly the same number of tokens.
        served = dataclasses.replace(
            served, info=served.info.model_copy(update={"eos_token_ids": []})
        )
        results: dict[str, Any] = {"kinds": {}, "new_tokens": args.new_tokens}
        for kind in args.kinds:
            adapter, adapter_config = load_adapter(
                adapter_dir(kind, served, tmp / "adapter"),
                fingerprint=served.info.fingerprint,
                head=served.head,
            )
            results["kinds"][kind] = {}
            for batch in BATCHES:
                config = GenerationConfig(
                    max_new_tokens=args.new_tokens,
                    lambda_max=0.5,
                    schedule="constant",
                    batch_size=batch,
                    num_beams=1,
                    no_repeat_ngram=0,
                )

                decoders = {
                    name: Generator(on, served, config, TEMPLATE, adapter, adapter_config)
                    for name, on in (("client", client), ("local", local))
                }
                sides = contestants(decoders, runner, examples[:batch], args.new_tokens)
                per_run = args.new_tokens * batch
                results["kinds"][kind][batch] = r = bench_batch(sides, counter, args, per_run)
                print(f"  {kind} B={batch}: {r['tokens_per_s']} ratio {r['ratio']:.3f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = decoding_parser(__doc__, 32, "tokens decoded per row")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="the server on the first core, this process (the client and the in-process sides) "
        "on the others, as on two machines (use with --threads 1 on a 2-core machine)",
    )
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
