"""The embedded SmolLM2 behind a real uvicorn server: the parity checks, over loopback HTTP."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_owner_client.client import PemaClient, ServerError
from data_owner_client.data import TEMPLATES, Example
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.served_model import ServedModel
from plm_owner_server.embedded import ensure_embedded_model
from plm_owner_server.settings import Settings
from tests.uvicorn_server import uvicorn_server

pytestmark = pytest.mark.slow
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Translate to German: Good morning!",
    "In the beginning God created the heaven and the earth.",
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with uvicorn_server(
        "--log-level", "warning", log=log, env={"PEMA_MODEL": "smollm2-135m"}
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    with PemaClient(server_url) as c:
        yield c


@pytest.fixture(scope="module")
def reference_model():
    """Plain transformers over the same converted folder, with f(c) hooked off ``model.norm``."""
    path = ensure_embedded_model(Settings().cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _reference(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    captured = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    return captured[0][0], logits


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal up to float32 rounding, scaled to the data: SmolLM2's residual stream reaches
    magnitudes in the thousands, so batching changes low bits by more than a fixed 1e-5."""
    error = (actual - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert error <= bound, f"max |difference| {error:.3g} exceeds {bound:.3g}"


def test_model_info_and_tokenizer(client, reference_model, tmp_path: Path):
    model, tokenizer = reference_model
    info = client.model_info()
    assert (info.architecture, info.hidden_size, info.vocab_size) == ("llama", 576, 49152)
    assert info.fingerprint.startswith("sha256:") and info.head_shared
    assert tokenizer.eos_token_id in info.eos_token_ids
    served = AutoTokenizer.from_pretrained(client.download_tokenizer(tmp_path / "tok"))
    assert served(TEXTS).input_ids == tokenizer(TEXTS).input_ids


def test_represent_and_head_equal_in_process_forward(client, reference_model):
    model, tokenizer = reference_model
    rows = tokenizer(TEXTS).input_ids
    head = client.head()
    answer = client.represent(rows, start=[0, 2, 5], logits="full")
    for b, (row, got) in enumerate(zip(rows, answer.rows(), strict=True)):
        ref_hidden, ref_logits = _reference(model, row)
        start = [0, 2, 5][b]
        _close(got, ref_hidden[start:], rel=1e-5)
        _close(answer.logits[answer.offsets[b] : answer.offsets[b + 1]], ref_logits[start:], 1e-5)
        with torch.no_grad():
            _close(head(got), ref_logits[start:], rel=1e-5)


def test_row_batched_with_longer_rows_equals_row_alone(client, reference_model):
    rows = reference_model[1](TEXTS).input_ids
    alone = client.represent([rows[1]]).hidden
    batched = client.represent(rows).rows()[1]
    _close(batched, alone, rel=1e-5)


def test_session_steps_equal_full_forward_and_greedy_decoding(client, reference_model):
    model, tokenizer = reference_model
    prompts = tokenizer(TEXTS[:2]).input_ids
    session, hidden, _ = client.open_session(prompts, logits=1)
    head = client.head()
    seqs = [list(p) for p in prompts]
    steps = [[h] for h in hidden]
    for _ in range(6):
        with torch.no_grad():
            tokens = head(torch.stack([s[-1] for s in steps])).argmax(-1).tolist()
        for seq, token in zip(seqs, tokens, strict=True):
            seq.append(token)
        hidden, _ = client.step(session, tokens)
        for row, h in zip(steps, hidden, strict=True):
            row.append(h)
    client.close_session(session)
    for seq, got in zip(seqs, steps, strict=True):
        ref_hidden, _ = _reference(model, seq)
        _close(torch.stack(got), ref_hidden[-len(got) :], rel=1e-5)
    with pytest.raises(ServerError) as excinfo:
        client.step(session, [1, 1])
    assert excinfo.value.status == 404


def _greedy_session(url: str, prompts: list[list[int]], steps: int, barrier: threading.Barrier):
    """Decode greedily in a session of its own client, in step with the other threads; the
    last row finishes after 3 steps. Returns each row's sequence and representations."""
    with PemaClient(url) as client:
        head = client.head()
        session, hidden, _ = client.open_session(prompts)
        seqs, reps = [list(p) for p in prompts], [[h] for h in hidden]
        rows = list(range(len(prompts)))
        for step in range(steps):
            if step == 3 and len(rows) > 1:
                rows = rows[:-1]
            with torch.no_grad():
                tokens = head(torch.stack([reps[r][-1] for r in rows])).argmax(-1).tolist()
            for r, token in zip(rows, tokens, strict=True):
                seqs[r].append(token)
            barrier.wait(timeout=60)  # every client steps at once: they share passes
            hidden, _ = client.step(session, tokens, rows=rows)
            for r, h in zip(rows, hidden, strict=True):
                reps[r].append(h)
        client.close_session(session)
    return seqs, reps


def test_concurrent_sessions_share_passes_and_equal_the_full_forward(
    server_url, client, reference_model
):
    """Three clients with prompts of different lengths decode at once, rows finishing at
    different steps: the server steps them in shared passes, and every representation equals a
    plain forward of that row alone."""
    model, tokenizer = reference_model
    sessions = [tokenizer(TEXTS[:2]).input_ids, tokenizer(TEXTS[1:2]).input_ids]
    sessions.append(tokenizer(TEXTS[2:] + TEXTS[:1]).input_ids)
    barrier = threading.Barrier(len(sessions))
    with ThreadPoolExecutor(len(sessions)) as pool:
        futures = [pool.submit(_greedy_session, server_url, p, 8, barrier) for p in sessions]
        results = [f.result() for f in futures]
    for seqs, reps in results:
        for seq, got in zip(seqs, reps, strict=True):
            ref_hidden, _ = _reference(model, seq)
            _close(torch.stack(got), ref_hidden[-len(got) :], rel=1e-5)
    metrics = httpx.get(f"{server_url}/metrics").text
    count = _metric(metrics, 'pema_pass_requests_count{kind="step"}')
    total = _metric(metrics, 'pema_pass_requests_sum{kind="step"}')
    assert total > count  # some step passes served several sessions


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


def test_pema_client_at_lambda_zero_decodes_as_transformers_greedy(
    client, reference_model, tmp_path: Path
):
    model, tokenizer = reference_model
    served = ServedModel.fetch(client, cache_dir=tmp_path)
    config = GenerationConfig(max_new_tokens=24, lambda_max=0.0, batch_size=len(TEXTS))
    outputs = list(
        Generator(client, served, config, TEMPLATES["translate"]).generate(
            [Example(text, None) for text in TEXTS]
        )
    )
    for text, output in zip(TEXTS, outputs, strict=True):
        ids = tokenizer(TEMPLATES["translate"].replace("{source}", text), return_tensors="pt")
        with torch.no_grad():
            reference = model.generate(**ids, max_new_tokens=24, do_sample=False)
        expected = reference[0, ids.input_ids.shape[1] :].tolist()
        assert output.token_ids == expected, text
        assert output.finish_reason == (
            "eos" if expected[-1] in served.info.eos_token_ids else "length"
        )
