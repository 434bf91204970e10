"""Request validation: every bad request is a 4xx with the error shape and a message that says what
to fix, never a 500; and the service routes (model info, tokenizer, docs, metrics) answer."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from plm_owner_server import api_router
from plm_owner_server.app import create_app
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from shared.codec import decode_tensor, pack
from shared.protocol import (
    MSGPACK,
    PROTOCOL_VERSION,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)
from tests.server.helpers import answer, assert_error, assert_same_logits, post, serve
from tests.tiny_models import MAX_POSITIONS, VOCAB

LIMITS = dict(
    max_batch_size=4,
    max_request_tokens=200,
    max_body_bytes=4096,
    max_logits_values=10 * VOCAB,
    max_new_tokens=3,
)
GOOD = RepresentRequest(sequences=[[5, 9, 17, 33], [4, 70, 3]], start=[1, 0], logits=3)
PROMPTS = [[5, 6, 7], [8, 9], [10]]


@pytest.fixture(scope="module")
def client(runner: ModelRunner) -> Iterator[TestClient]:
    with serve(runner, **LIMITS) as client:
        yield client


@pytest.fixture(scope="module")
def reference(runner: ModelRunner) -> list[torch.Tensor]:
    """GOOD's representations, each row run alone straight through the runner."""
    return [
        runner.represent([row], [start], max_batch_tokens=1024)[0]
        for row, start in zip(GOOD.sequences, GOOD.starts(), strict=True)
    ]


@pytest.fixture
def session(client: TestClient) -> Iterator[str]:
    """A live three-row session, closed afterwards."""
    opened = answer(
        post(client, "/v1/sessions", SessionOpenRequest(sequences=PROMPTS)),
        SessionOpenResponse,
        status=201,
    )
    yield opened.session_id
    client.delete(f"/v1/sessions/{opened.session_id}")


def assert_still_serving(client: TestClient, reference: list[torch.Tensor]) -> None:
    """A good /v1/represent still gets the right representations."""
    got = answer(post(client, "/v1/represent", GOOD), RepresentResponse)
    hidden = decode_tensor(got.hidden)
    assert got.offsets == [0, 3, 6]
    for b, want in enumerate(reference):
        row = hidden[got.offsets[b] : got.offsets[b + 1]]
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)


def send(client: TestClient, path: str, body: dict[str, Any], encoding: str) -> Any:
    if encoding == "json":
        return client.post(path, json=body)
    return post(client, path, body)


def step(client: TestClient, session_id: str, body: dict[str, Any]) -> Any:
    return post(client, f"/v1/sessions/{session_id}/step", body)


def rule(name: str, *values: Any) -> Any:
    return pytest.param(*values, id=name)


# Rules that /v1/represent and /v1/sessions share: (body, status, code, a hint in the message).
SEQUENCE_RULES = [
    rule("too_many_sequences", {"sequences": [[5]] * 5}, 413, "batch_too_large", "limit is 4"),
    rule("too_many_tokens", {"sequences": [[5] * 101] * 2}, 413, "too_many_tokens", "limit is 200"),
    rule(
        "longer_than_context",
        {"sequences": [[5] * (MAX_POSITIONS + 1)]},
        422,
        "sequence_too_long",
        f"context is {MAX_POSITIONS}, so truncate",
    ),
    rule(
        "token_id_ge_vocab",
        {"sequences": [[5, VOCAB]]},
        422,
        "token_out_of_range",
        f"must be in [0, {VOCAB})",
    ),
    rule("negative_token_id", {"sequences": [[5, -1]]}, 422, "invalid_request", "sequences.0.1"),
    rule("no_sequences", {"sequences": []}, 422, "invalid_request", "sequences"),
    rule("empty_sequence", {"sequences": [[5], []]}, 422, "invalid_request", "sequences.1"),
    rule("missing_sequences", {"dtype": "float32"}, 422, "invalid_request", "sequences"),
    rule(
        "unknown_dtype", {"sequences": [[5]], "dtype": "float64"}, 422, "invalid_request", "dtype"
    ),
    rule("logits_word", {"sequences": [[5]], "logits": "some"}, 422, "invalid_request", "logits"),
    rule("logits_zero", {"sequences": [[5]], "logits": 0}, 422, "invalid_request", "logits"),
    rule("logits_true", {"sequences": [[5]], "logits": True}, 422, "invalid_request", "logits"),
    rule(
        "logits_over_vocab",
        {"sequences": [[5]], "logits": VOCAB + 1},
        422,
        "logits_out_of_range",
        f"k ≤ {VOCAB}",
    ),
    rule("boolean_token", {"sequences": [[5, True]]}, 422, "invalid_request", "sequences.0.1"),
    rule("string_token", {"sequences": [["5"]]}, 422, "invalid_request", "sequences.0.0"),
    rule(
        "unknown_field",
        {"sequences": [[5]], "temperature": 0.5},
        422,
        "invalid_request",
        "temperature",
    ),
]
REPRESENT_RULES = [
    rule(
        "start_out_of_range",
        {"sequences": [[5, 6]], "start": [2]},
        422,
        "inconsistent_request",
        "start[0] = 2 must be in [0, 1]",
    ),
    rule(
        "start_length_mismatch",
        {"sequences": [[5, 6]], "start": [0, 0]},
        422,
        "inconsistent_request",
        "start has 2 entries but there are 1 sequences",
    ),
    rule(
        "full_logits_over_limit",
        {"sequences": [[5] * 11], "logits": "full"},
        413,
        "logits_too_large",
        "ask for top-k logits",
    ),
]
# Bodies that never become a request: (content, content type, status, code, hint).
BODY_RULES = [
    rule("malformed_msgpack", b"\xc1", MSGPACK, 400, "malformed_body", "not valid msgpack"),
    rule("truncated_msgpack", pack(GOOD)[:-2], MSGPACK, 400, "malformed_body", "msgpack"),
    rule(
        "msgpack_int_keys",
        msgpack.packb({1: [[5]]}),
        MSGPACK,
        400,
        "malformed_body",
        "msgpack",
    ),
    rule(
        "malformed_json",
        b'{"sequences": [[5,',
        "application/json",
        400,
        "malformed_body",
        "not valid JSON",
    ),
    rule("json_not_an_object", b"[[5, 6]]", "application/json", 422, "invalid_request", "body"),
    rule(
        "unsupported_content_type",
        b"sequences=5",
        "text/plain",
        415,
        "unsupported_media_type",
        f"send {MSGPACK} or application/json",
    ),
    rule("body_too_large", b"\0" * 5000, MSGPACK, 413, "body_too_large", "exceeds 4096 bytes"),
]
STEP_RULES = [
    rule(
        "rows_tokens_mismatch",
        {"tokens": [5, 6], "rows": [0]},
        "inconsistent_request",
        "rows has 1 entries but tokens has 2",
    ),
    rule("tokens_for_fewer_rows", {"tokens": [5]}, "inconsistent_request", "1 tokens for 3 live"),
    rule("repeated_row", {"tokens": [5, 6], "rows": [0, 0]}, "inconsistent_request", "not repeat"),
    rule("boolean_token", {"tokens": [5, 6, False]}, "invalid_request", "tokens.2"),
    rule("string_row", {"tokens": [5], "rows": ["0"]}, "invalid_request", "rows.0"),
    rule("unknown_row", {"tokens": [5], "rows": [7]}, "row_not_live", "rows [7] are not live"),
    rule("token_id_ge_vocab", {"tokens": [5, 6, VOCAB]}, "token_out_of_range", "/v1/tokenizer"),
    rule("negative_token_id", {"tokens": [5, 6, -1]}, "invalid_request", "tokens.2"),
    rule("no_tokens", {"tokens": []}, "invalid_request", "tokens"),
    rule("unknown_field", {"tokens": [5, 6, 7], "top_p": 0.9}, "invalid_request", "top_p"),
]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize("path", ["/v1/represent", "/v1/sessions"])
@pytest.mark.parametrize(("body", "status", "code", "hint"), SEQUENCE_RULES)
def test_bad_sequences_are_refused(client, reference, path, encoding, body, status, code, hint):
    """Batch, length, token-id and field rules hold on both routes and both encodings."""
    error = assert_error(send(client, path, body, encoding), status, code)
    assert hint in error.message
    assert_still_serving(client, reference)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(("body", "status", "code", "hint"), REPRESENT_RULES)
def test_bad_starts_and_logits_are_refused(client, reference, encoding, body, status, code, hint):
    """Starts must index their sequence; full logits are bounded in size."""
    error = assert_error(send(client, "/v1/represent", body, encoding), status, code)
    assert hint in error.message
    assert_still_serving(client, reference)


@pytest.mark.parametrize(("content", "content_type", "status", "code", "hint"), BODY_RULES)
def test_bad_bodies_are_refused(client, reference, content, content_type, status, code, hint):
    """Bodies that do not decode, or are too large, are client errors."""
    response = client.post("/v1/represent", content=content, headers={"content-type": content_type})
    error = assert_error(response, status, code)
    assert hint in error.message
    assert_still_serving(client, reference)


def test_streamed_body_too_large_is_refused(client, reference):
    """A chunked body with no content-length is cut off once it passes the limit."""

    def chunks() -> Iterator[bytes]:
        yield from [b"\0" * 1024] * 5

    response = client.post("/v1/represent", content=chunks(), headers={"content-type": MSGPACK})
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413, "body_too_large")
    assert "split the batch" in error.message
    assert_still_serving(client, reference)


@pytest.mark.parametrize(("body", "code", "hint"), STEP_RULES)
def test_bad_steps_are_refused_and_leave_the_session_intact(
    client, reference, session, body, code, hint
):
    """A refused step changes nothing: the session then takes a good step."""
    error = assert_error(step(client, session, body), 422, code)
    assert hint in error.message
    good = answer(step(client, session, {"tokens": [11, 12, 13]}), SessionStepResponse)
    assert good.hidden.shape == [3, 32]
    assert_still_serving(client, reference)


def test_step_naming_a_finished_row_is_refused(client, session):
    """A row left out of a step is finished; naming it later is a 422."""
    answer(step(client, session, {"tokens": [11, 12], "rows": [0, 2]}), SessionStepResponse)
    error = assert_error(step(client, session, {"tokens": [13], "rows": [1]}), 422, "row_not_live")
    assert "rows [1] are not live" in error.message and "[0, 2]" in error.message


def test_steps_beyond_max_new_tokens_are_refused(client, session):
    """A session takes at most max_new_tokens steps."""
    for token in range(LIMITS["max_new_tokens"]):
        answer(step(client, session, {"tokens": [token] * 3}), SessionStepResponse)
    error = assert_error(step(client, session, {"tokens": [5, 6, 7]}), 422, "max_new_tokens")
    assert "close it" in error.message


def test_steps_beyond_the_context_are_refused(client):
    """A session cannot grow past the model's context."""
    prompt = [5] * (MAX_POSITIONS - 2)
    opened = answer(
        post(client, "/v1/sessions", SessionOpenRequest(sequences=[prompt])),
        SessionOpenResponse,
        status=201,
    )
    path = f"/v1/sessions/{opened.session_id}/step"
    for _ in range(2):
        answer(post(client, path, SessionStepRequest(tokens=[5])), SessionStepResponse)
    error = assert_error(post(client, path, SessionStepRequest(tokens=[5])), 422, "context_full")
    assert str(MAX_POSITIONS) in error.message
    assert client.delete(f"/v1/sessions/{opened.session_id}").status_code == 204


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/sessions/no-such-id/step"), ("DELETE", "/v1/sessions/no-such-id")],
)
def test_unknown_session_is_not_found(client, method, path):
    """An unknown session id is a 404 telling the client to open a new one."""
    body = pack(SessionStepRequest(tokens=[5])) if method == "POST" else None
    response = client.request(method, path, content=body, headers={"content-type": MSGPACK})
    error = assert_error(response, 404, "session_not_found")
    assert "open a new one" in error.message


@pytest.mark.parametrize("path", ["/v2/represent", "/v1/nothing", "/"])
def test_unknown_route_is_a_404_with_the_error_shape(client, path):
    """Unknown paths answer with the error shape too."""
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/represent", "POST"),
        ("DELETE", "/v1/model", "GET"),
        ("PUT", "/v1/sessions", "POST"),
        ("GET", "/v1/sessions/some-id/step", "POST"),
    ],
)
def test_wrong_method_is_a_405_with_the_error_shape(client, method, path, allowed):
    """A known path with the wrong method is a 405 that names the allowed method."""
    response = client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["allow"]


@pytest.mark.parametrize("logits", ["none", "full", 3])
def test_json_and_msgpack_give_the_same_answer(client, logits):
    """The JSON answer (base64 bytes) decodes to the very tensors of the msgpack answer."""
    body = GOOD.model_copy(update={"logits": logits})
    packed = answer(post(client, "/v1/represent", body), RepresentResponse)
    response = client.post("/v1/represent", json=body.model_dump(exclude_none=True))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    data = response.json()["hidden"]["data"]  # pydantic writes the URL-safe base64 alphabet
    assert isinstance(data, str) and base64.urlsafe_b64decode(data) == packed.hidden.data
    as_json = RepresentResponse.model_validate_json(response.content)
    assert as_json.offsets == packed.offsets
    assert as_json.fingerprint == packed.fingerprint
    assert torch.equal(decode_tensor(as_json.hidden), decode_tensor(packed.hidden))
    assert_same_logits(as_json.logits, packed.logits)


@pytest.mark.parametrize(
    ("content_type", "accept", "answered"),
    [
        (MSGPACK, "*/*", MSGPACK),
        (MSGPACK, "application/json", "application/json"),
        ("application/json", MSGPACK, MSGPACK),
        ("application/json", "*/*", "application/json"),
    ],
)
def test_answer_format_follows_accept_then_content_type(client, content_type, accept, answered):
    """The answer is msgpack when accepted, or when sent and JSON was not asked for."""
    body = pack(GOOD) if content_type == MSGPACK else GOOD.model_dump_json().encode()
    response = client.post(
        "/v1/represent", content=body, headers={"content-type": content_type, "accept": accept}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == answered


def test_model_info_has_the_design_fields(client, runner):
    """/v1/model describes the served model with the fields the design fixes."""
    info = client.get("/v1/model").json()
    assert info["model_id"] == "tiny-llama"
    assert info["architecture"] == "llama"
    assert info["hidden_size"] == 32
    assert info["vocab_size"] == VOCAB
    assert info["max_positions"] == MAX_POSITIONS
    assert info["dtype"] == "float32"
    assert info["fingerprint"] == runner.fingerprint and info["fingerprint"].startswith("sha256:")
    assert info["protocol_version"] == PROTOCOL_VERSION
    assert info["head_shared"] is True
    assert info["eos_token_ids"] == [2]
    assert info["limits"]["max_batch_size"] == LIMITS["max_batch_size"]


def test_tokenizer_zip_loads_with_auto_tokenizer(client, runner, tmp_path):
    """The /v1/tokenizer zip, extracted, is a tokenizer that encodes like the server's."""
    response = client.get("/v1/tokenizer")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("w5 w6")["input_ids"] == runner.tokenizer("w5 w6")["input_ids"]
    assert tokenizer.encode("w5 w6", add_special_tokens=False) == [5, 6]


def test_openapi_lists_every_route_and_docs_answer(client):
    """The OpenAPI document names every route of the app, and /docs renders."""
    spec = client.get("/openapi.json").json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = {
        (route.path, method)
        for route in [*api_router.router.routes, *api_router.public.routes]
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert served == documented
    assert {
        ("/v1/health", "GET"),
        ("/metrics", "GET"),
        ("/v1/model", "GET"),
        ("/v1/tokenizer", "GET"),
        ("/v1/head", "GET"),
        ("/v1/represent", "POST"),
        ("/v1/sessions", "POST"),
        ("/v1/sessions/{session_id}/step", "POST"),
        ("/v1/sessions/{session_id}", "DELETE"),
    } <= documented
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


def request_counts(text: str) -> dict[tuple[str, str, str], float]:
    """``pema_requests_total`` samples by (method, route, status)."""
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pema_requests_total"
    }


def test_metrics_count_the_requests_made(runner):
    """/metrics is Prometheus text counting requests by route template and status."""
    with serve(runner) as client:
        for _ in range(3):
            answer(post(client, "/v1/represent", GOOD), RepresentResponse)
        assert_error(post(client, "/v1/represent", {"sequences": []}), 422, "invalid_request")
        client.get("/v1/sessions/abc/step")
        client.get("/no/such/route")
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'pema_requests_total{method="POST",route="/v1/represent",status="200"} 3.0' in (
        response.text
    )
    assert request_counts(response.text) == {
        ("POST", "/v1/represent", "200"): 3,
        ("POST", "/v1/represent", "422"): 1,
        ("GET", "/v1/sessions/{session_id}/step", "405"): 1,
        ("GET", "unmatched", "404"): 1,
    }
    tokens = sum(map(len, GOOD.sequences)) * 3
    assert f"pema_represented_tokens_total {float(tokens)}" in response.text


def test_model_failure_is_a_counted_500_and_the_server_recovers(runner, monkeypatch):
    """An unexpected error is a 500 with the error shape, counted; later requests succeed."""
    represent = runner.represent
    monkeypatch.setattr(runner, "represent", lambda *args: 1 / 0)
    app = create_app(Settings(), runner=runner)
    with TestClient(app, raise_server_exceptions=False) as client:
        error = assert_error(post(client, "/v1/represent", GOOD), 500, "internal_error")
        assert "server log" in error.message
        monkeypatch.setattr(runner, "represent", represent)
        answer(post(client, "/v1/represent", GOOD), RepresentResponse)
        counts = request_counts(client.get("/metrics").text)
    assert counts[("POST", "/v1/represent", "500")] == 1
    assert counts[("POST", "/v1/represent", "200")] == 1
