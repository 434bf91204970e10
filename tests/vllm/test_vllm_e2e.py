"""The whole client pipeline against `pema-server --backend vllm` and `--backend transformers`
on the embedded SmolLM2, two real uvicorn servers: the same f(c) and logits, the same memory, and
token-identical greedy decoding, with the PLM alone and with an adapter trained on that memory."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from data_owner_client import cli
from data_owner_client.adapter import SequenceConfig, load_adapter
from data_owner_client.client import PemaClient
from data_owner_client.data import TEMPLATES, Example
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.memory import Memory, build_memory
from data_owner_client.served_model import ServedModel
from data_owner_client.train import TrainConfig, train
from tests.uvicorn_server import uvicorn_server

pytestmark = pytest.mark.slow
TEMPLATE = TEMPLATES["translate"]
PAIRS = [
    Example(f"The {animal} is {colour}.", f"Der {tier} ist {farbe}.")
    for animal, tier in (("dog", "Hund"), ("bird", "Vogel"), ("fish", "Fisch"), ("cat", "Kater"))
    for colour, farbe in (("red", "rot"), ("black", "schwarz"), ("small", "klein"))
]
PROMPTS = [Example("The horse is brown.", None), Example("My house is very old.", None)]


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Each backend's server (float32, so both compute in the same dtype)."""
    logs = tmp_path_factory.mktemp("logs")
    flags = ("--dtype", "float32", "--max-kv-cache-mib", "512")
    with (
        uvicorn_server("--backend", "transformers", *flags, log=logs / "t.log") as reference,
        uvicorn_server("--backend", "vllm", *flags, log=logs / "v.log") as engine,
    ):
        yield {"transformers": reference, "vllm": engine}


@pytest.fixture(scope="module")
def servers(urls) -> Iterator[dict[str, PemaClient]]:
    """A client of each backend's server."""
    with PemaClient(urls["transformers"]) as reference, PemaClient(urls["vllm"]) as engine:
        yield {"transformers": reference, "vllm": engine}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_both_serve_the_same_model_states_and_logits(servers):
    infos = {name: client.model_info() for name, client in servers.items()}
    assert infos["vllm"].fingerprint == infos["transformers"].fingerprint
    sequences, starts = [[1, 504, 2365, 314, 1345, 30], list(range(1, 70))], [0, 40]
    out = {
        name: client.represent(sequences, starts, dtype="float32", logits=5)
        for name, client in servers.items()
    }
    assert relative_difference(out["vllm"].hidden, out["transformers"].hidden) < 1e-4
    assert torch.equal(out["vllm"].logits[1], out["transformers"].logits[1])  # top-5 ids


def test_greedy_decoding_is_token_identical(servers, tmp_path):
    config = GenerationConfig(max_new_tokens=24, lambda_max=0.0, batch_size=2)
    outputs = {name: decode(client, config, tmp_path / name) for name, client in servers.items()}
    assert outputs["vllm"] == outputs["transformers"]


@pytest.fixture(scope="module")
def memories(servers, tmp_path_factory) -> dict[str, Memory]:
    """The memory of PAIRS built through each server (float32)."""
    tmp = tmp_path_factory.mktemp("memories")
    return {
        name: build_memory(
            client,
            ServedModel.fetch(client, cache_dir=tmp / name).tokenizer,
            PAIRS,
            tmp / name / "memory",
            template=TEMPLATE,
            dtype="float32",
            progress=False,
        )
        for name, client in servers.items()
    }


@pytest.fixture(scope="module")
def adapter(servers, memories, tmp_path_factory) -> Path:
    """A sequence adapter trained on the memory built through the transformers server."""
    client, memory = servers["transformers"], memories["transformers"]
    tmp = tmp_path_factory.mktemp("adapter")
    served = ServedModel.fetch(client, cache_dir=tmp / "cache")
    assert served.head is not None
    config = SequenceConfig(
        served.info.hidden_size,
        served.info.vocab_size,
        width=64,
        heads=2,
        layers=1,
        fingerprint=served.info.fingerprint,
        template=TEMPLATE,
        length_ratio=memory.manifest.length_ratio,
    )
    settings = TrainConfig(stage2_epochs=2, sequence_batch_size=4, device="cpu")
    train(config, memory, memory, served.head, tmp / "adapter", settings, progress=False)
    return tmp / "adapter"


def test_memories_built_through_either_are_equal(memories):
    keys = {name: memory.load_all() for name, memory in memories.items()}
    assert torch.equal(keys["vllm"][1], keys["transformers"][1])  # the same targets
    assert relative_difference(keys["vllm"][0], keys["transformers"][0]) < 1e-4


def test_an_adapter_decodes_alike_through_either(servers, adapter, tmp_path):
    config = GenerationConfig(max_new_tokens=16, batch_size=2)
    outputs = {
        name: decode(client, config, tmp_path / name, adapter) for name, client in servers.items()
    }
    assert outputs["vllm"] == outputs["transformers"]
    plm_alone = GenerationConfig(max_new_tokens=16, batch_size=2, lambda_max=0.0)
    assert outputs["vllm"] != decode(servers["vllm"], plm_alone, tmp_path / "vllm")  # it mixes


def test_evaluate_reports_alike_through_either(urls, adapter, tmp_path):
    """`pema-client evaluate`, the command, against each server."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in PAIRS[:4]))
    predictions = {}
    for name, url in urls.items():
        report_dir = tmp_path / name
        flags = ["--adapter", str(adapter), "--data", str(data), "--report", str(report_dir)]
        cli.main(["--server", url, "evaluate", *flags, "--max-new-tokens", "8", "--no-progress"])
        report = json.loads((report_dir / "report.json").read_text())
        assert set(report["results"]) == {"plm", "pema"}
        predictions[name] = [
            json.loads(line)["prediction"]
            for method in ("plm", "pema")
            for line in (report_dir / f"predictions_{method}.jsonl").read_text().splitlines()
        ]
    assert predictions["vllm"] == predictions["transformers"]


def test_the_prefix_cache_counts_are_exported(urls, servers):
    text = httpx.get(urls["vllm"] + "/metrics").text
    counts = {
        source: float(line.split()[-1])
        for line in text.splitlines()
        for source in ("cached", "computed")
        if line.startswith(f'pema_engine_session_tokens{{source="{source}"}}')
    }
    # A step reads the prefix's full blocks and computes the rest (up to one block of tokens).
    assert counts["cached"] > 0 and counts["computed"] > 0


def decode(
    client: PemaClient, config: GenerationConfig, cache: Path, adapter: Path | None = None
) -> list[list[int]]:
    """The token ids ``generate`` decodes for PROMPTS (with the adapter, when given)."""
    served = ServedModel.fetch(client, cache_dir=cache)
    loaded = (None, None)
    if adapter is not None:
        loaded = load_adapter(adapter, fingerprint=served.info.fingerprint, head=served.head)
    generator = Generator(client, served, config, TEMPLATE, *loaded)
    return [output.token_ids for output in generator.generate(PROMPTS, progress=False)]


def test_pema_client_serve_answers_alike_through_either(urls, adapter, tmp_path):
    """`pema-client serve` in front of each server: the same greedy completions."""
    body = {"model": "seq", "prompt": TEMPLATE.format(source="The cow is white."), "max_tokens": 8}
    texts = {}
    for name, url in urls.items():
        flags = ("serve", "--server", url, f"--adapter=seq={adapter}")
        with uvicorn_server(
            *flags, log=tmp_path / f"{name}.log", module="data_owner_client", health="/health"
        ) as service:
            answer = httpx.post(
                f"{service}/v1/completions", json={**body, "temperature": 0}, timeout=120
            )
            assert answer.status_code == 200, answer.text
            texts[name] = answer.json()["choices"][0]["text"]
    assert texts["vllm"] == texts["transformers"] and texts["vllm"]
