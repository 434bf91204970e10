"""Parity of the server's answers with a plain transformers reference, for every architecture."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from plm_owner_server.app import create_app
from plm_owner_server.settings import Settings
from shared.codec import decode_tensor, pack, unpack
from shared.head import Head
from shared.protocol import (
    MSGPACK,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from tests.tiny_models import ARCHITECTURES

# Written independently of the server's table: the module whose input is f(c).
REFERENCE_CAPTURE = {
    "gpt2": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
    "opt-no-final-norm": "model.decoder.project_out",
    "gpt_neox": "gpt_neox.final_layer_norm",
}
MSGPACK_HEADERS = {"content-type": MSGPACK, "accept": MSGPACK}
ROWS = [[5, 9, 17, 33, 8, 41, 60, 12, 7, 19, 23, 88], [4, 70, 3], [11, 12, 13, 14, 15, 16, 90]]


def reference(
    model: torch.nn.Module, arch: str, ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(c) from a forward hook on the final norm, and the model's own logits, for one row."""
    module = model.get_submodule(REFERENCE_CAPTURE.get(arch, "model.norm"))
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    return captured[0][0], logits


@pytest.fixture(params=ARCHITECTURES)
def served(request, make_runner):
    runner = make_runner(request.param)
    with TestClient(create_app(Settings(max_batch_tokens=24), runner=runner)) as client:
        yield request.param, runner, client


def post(client: TestClient, path: str, body, model):
    response = client.post(path, content=pack(body), headers=MSGPACK_HEADERS)
    assert response.status_code in (200, 201), response.text
    return unpack(response.content, model)


def test_represent_equals_hooked_forward_and_head_gives_model_logits(served):
    """/v1/represent is f(c); the head rebuilt from /v1/head maps it to the model's logits."""
    arch, runner, client = served
    head = Head.from_bytes(client.get("/v1/head").content)
    starts = [0, 1, 3]
    body = RepresentRequest(sequences=ROWS, start=starts, logits="full")
    answer = post(client, "/v1/represent", body, RepresentResponse)
    hidden, logits = decode_tensor(answer.hidden), decode_tensor(answer.logits)
    assert answer.offsets == [0, 12, 14, 18]
    assert answer.fingerprint == runner.fingerprint
    for b, (row, start) in enumerate(zip(ROWS, starts, strict=True)):
        ref_hidden, ref_logits = reference(runner.model, arch, row)
        got = slice(answer.offsets[b], answer.offsets[b + 1])
        torch.testing.assert_close(hidden[got], ref_hidden[start:], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[got], ref_logits[start:], rtol=0, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(head(hidden[got]), ref_logits[start:], rtol=0, atol=1e-4)


def test_top_k_logits_are_the_largest_full_logits(served):
    _, _, client = served
    full = post(
        client, "/v1/represent", RepresentRequest(sequences=ROWS, logits="full"), RepresentResponse
    )
    top = post(
        client, "/v1/represent", RepresentRequest(sequences=ROWS, logits=5), RepresentResponse
    )
    expected = decode_tensor(full.logits).topk(5, dim=-1)
    torch.testing.assert_close(decode_tensor(top.logits.values), expected.values)
    assert torch.equal(decode_tensor(top.logits.indices), expected.indices.to(torch.int32))


def test_row_batched_with_longer_rows_equals_row_alone(served):
    _, _, client = served
    alone = post(client, "/v1/represent", RepresentRequest(sequences=[ROWS[1]]), RepresentResponse)
    batched = post(client, "/v1/represent", RepresentRequest(sequences=ROWS), RepresentResponse)
    row = decode_tensor(batched.hidden)[batched.offsets[1] : batched.offsets[2]]
    torch.testing.assert_close(row, decode_tensor(alone.hidden), rtol=0, atol=1e-5)


def test_session_steps_equal_full_forward(served):
    """Ragged prompts, rows finishing at different steps: each step equals a full forward."""
    arch, runner, client = served
    prompts = [ROWS[0][:4], ROWS[1][:2], ROWS[2][:5]]
    opened = post(
        client,
        "/v1/sessions",
        SessionOpenRequest(sequences=prompts, logits="full"),
        SessionOpenResponse,
    )
    got = {b: [row] for b, row in enumerate(decode_tensor(opened.hidden))}
    live = [0, 1, 2]
    for step in range(4):
        live = live[: 3 - step // 2]  # row 2 finishes after 2 steps
        tokens = [ROWS[b][len(prompts[b])] if b != 1 else 20 + step for b in live]
        for b, t in zip(live, tokens, strict=True):
            prompts[b] = prompts[b] + [t]
        body = SessionStepRequest(tokens=tokens, rows=live)
        answer = post(client, f"/v1/sessions/{opened.session_id}/step", body, SessionStepResponse)
        for b, row in zip(live, decode_tensor(answer.hidden), strict=True):
            got[b].append(row)
    for b, prompt in enumerate(prompts):
        ref_hidden, _ = reference(runner.model, arch, prompt)
        stepped = torch.stack(got[b])
        torch.testing.assert_close(stepped, ref_hidden[-len(stepped) :], rtol=0, atol=1e-4)


def test_session_logits_equal_model_logits(served):
    arch, runner, client = served
    prompts = [ROWS[0][:6], ROWS[1]]
    body = SessionOpenRequest(sequences=prompts, logits="full")
    opened = post(client, "/v1/sessions", body, SessionOpenResponse)
    for b, prompt in enumerate(prompts):
        _, ref_logits = reference(runner.model, arch, prompt)
        torch.testing.assert_close(
            decode_tensor(opened.logits)[b], ref_logits[-1], rtol=0, atol=1e-4
        )
