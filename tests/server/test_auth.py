"""Bearer API keys (stored hashed), the open mode, head sharing and per-key sessions."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from plm_owner_server.app import create_app
from plm_owner_server.auth import ApiKeys, hash_key
from plm_owner_server.cli import main
from plm_owner_server.errors import ApiError
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from shared.protocol import RepresentRequest, SessionOpenRequest, SessionOpenResponse
from tests.server.helpers import answer, assert_error, post, serve

ALICE, BOB = "pema_alice-secret", "pema_bob-secret"
PROTECTED = [
    ("GET", "/v1/model"),
    ("GET", "/v1/tokenizer"),
    ("GET", "/v1/head"),
    ("POST", "/v1/represent"),
    ("POST", "/v1/sessions"),
    ("POST", "/v1/sessions/some-id/step"),
    ("DELETE", "/v1/sessions/some-id"),
]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def write_keys(path: Path) -> Path:
    """Alice's key with a name, Bob's without, among comments and blank lines."""
    path.write_text(f"# owners\n{hash_key(ALICE)} alice\n\n{hash_key(BOB)}  # no name\n")
    return path


@pytest.fixture(scope="module")
def client(runner: ModelRunner, tmp_path_factory) -> Iterator[TestClient]:
    keys = write_keys(tmp_path_factory.mktemp("auth") / "keys")
    with serve(runner, api_keys_file=keys, max_sessions_per_key=1) as client:
        yield client


def owner_of(keys: ApiKeys, authorization: str) -> str:
    """Who ``keys`` says sends this Authorization header."""
    scope = {"type": "http", "headers": [(b"authorization", authorization.encode())]}
    return keys.owner(Request(scope))


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    ("authorization", "hint"),
    [
        (None, "missing API key"),
        ("Bearer ", "missing API key"),
        (f"Basic {ALICE}", "missing API key"),
        (ALICE, "missing API key"),
        ("Bearer pema_wrong", "invalid API key"),
    ],
    ids=["none", "empty", "basic_scheme", "no_scheme", "wrong_key"],
)
def test_protected_routes_refuse_a_missing_or_wrong_key(client, method, path, authorization, hint):
    """Every model and data route is a 401 with the error shape without a valid key."""
    headers = {"authorization": authorization} if authorization is not None else {}
    response = client.request(method, path, headers=headers)
    error = assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"  # RFC 6750
    assert hint in error.message


@pytest.mark.parametrize("key", [ALICE, BOB])
@pytest.mark.parametrize("path", ["/v1/model", "/v1/tokenizer", "/v1/head"])
def test_valid_key_opens_the_routes(client, key, path):
    """A key listed in the keys file (named or not) gets an answer."""
    assert client.get(path, headers=bearer(key)).status_code == 200


def test_valid_key_represents(client):
    """A valid key (scheme case-insensitive) gets representations."""
    request = RepresentRequest(sequences=[[5, 6, 7]])
    for authorization in (f"Bearer {ALICE}", f"bearer {BOB}"):
        response = post(client, "/v1/represent", request, {"authorization": authorization})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/health", "/metrics"])
def test_health_and_metrics_stay_open(client, path):
    """Probes and scrapers need no key."""
    response = client.get(path)
    assert response.status_code == 200
    if path == "/v1/health":
        assert response.json() == {"status": "ok"}


def test_sessions_belong_to_their_key(client):
    """Another key's session is as unknown as a missing one, and the cap is per key."""
    opened = answer(
        post(client, "/v1/sessions", SessionOpenRequest(sequences=[[5, 6]]), bearer(ALICE)),
        SessionOpenResponse,
        status=201,
    )
    step = f"/v1/sessions/{opened.session_id}/step"
    assert_error(post(client, step, {"tokens": [7]}, bearer(BOB)), 404, "session_not_found")
    assert_error(
        client.delete(f"/v1/sessions/{opened.session_id}", headers=bearer(BOB)),
        404,
        "session_not_found",
    )
    # Alice is at her cap of one session; Bob is not.
    again = post(client, "/v1/sessions", SessionOpenRequest(sequences=[[5]]), bearer(ALICE))
    assert_error(again, 429, "too_many_sessions")
    bobs = answer(
        post(client, "/v1/sessions", SessionOpenRequest(sequences=[[5]]), bearer(BOB)),
        SessionOpenResponse,
        status=201,
    )
    assert post(client, step, {"tokens": [7]}, bearer(ALICE)).status_code == 200
    for session_id, key in ((opened.session_id, ALICE), (bobs.session_id, BOB)):
        response = client.delete(f"/v1/sessions/{session_id}", headers=bearer(key))
        assert response.status_code == 204


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (f"{hash_key(ALICE)} alice\nsha256:abc123 bob\n", 2),
        (f"# comment\n\n{ALICE}\n", 3),
        (f"md5:{'0' * 64}\n", 1),
    ],
    ids=["short_digest", "plain_key", "other_hash"],
)
def test_malformed_keys_file_fails_at_start_naming_file_and_line(runner, tmp_path, content, line):
    """create_app refuses a bad keys file, naming the file and the line to fix."""
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ValueError, match="hash-key") as raised:
        create_app(Settings(api_keys_file=path), runner=runner)
    assert f"{path}:{line}:" in str(raised.value)


@pytest.mark.parametrize(
    ("content", "hint"), [("# only a comment\n\n", "holds no keys"), (None, "cannot read")]
)
def test_empty_or_missing_keys_file_fails_at_start(runner, tmp_path, content, hint):
    """A keys file with no keys, or none at all, never silently opens the server."""
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=hint) as raised:
        create_app(Settings(api_keys_file=path), runner=runner)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("name", [None, "carol"])
def test_hash_key_stdin_prints_a_line_the_keys_file_accepts(monkeypatch, capsys, tmp_path, name):
    """`pema-server hash-key --stdin` hashes the given key into a keys-file line."""
    monkeypatch.setattr("sys.stdin", io.StringIO("pema_carol-secret\n"))
    main(["hash-key", "--stdin", *(["--name", name] if name else [])])
    out = capsys.readouterr().out
    assert "pema_carol-secret" not in out
    path = tmp_path / "keys"
    path.write_text(out)
    keys = ApiKeys.from_file(path)
    owner = owner_of(keys, "Bearer pema_carol-secret")
    assert owner == (name or f"key-{hash_key('pema_carol-secret')[7:15]}")
    with pytest.raises(ApiError, match="invalid API key"):
        owner_of(keys, "Bearer pema_other")


def test_hash_key_makes_a_new_key_and_its_line(capsys, tmp_path):
    """Without --stdin, a fresh key goes to stderr and only its hash to stdout."""
    main(["hash-key", "--name", "dave"])
    captured = capsys.readouterr()
    key = captured.err.strip().rsplit(" ", 1)[-1]
    assert key.startswith("pema_") and key not in captured.out
    path = tmp_path / "keys"
    path.write_text(captured.out)
    assert owner_of(ApiKeys.from_file(path), f"Bearer {key}") == "dave"


def test_no_keys_file_runs_open_and_warns(runner, caplog):
    """With no keys file every route answers without a key, and the log says so."""
    with caplog.at_level(logging.WARNING, logger="plm_owner_server.app"), serve(runner) as client:
        assert client.get("/v1/model").status_code == 200
        assert post(client, "/v1/represent", {"sequences": [[5]]}).status_code == 200
    assert any(
        r.levelno == logging.WARNING and "no API keys" in r.getMessage() for r in caplog.records
    )


def test_keys_file_silences_the_open_warning(runner, tmp_path, caplog):
    """A server with keys does not warn that it is open."""
    keys = write_keys(tmp_path / "keys")
    with caplog.at_level(logging.WARNING, logger="plm_owner_server.app"):
        with serve(runner, api_keys_file=keys):
            pass
    assert not any("no API keys" in r.getMessage() for r in caplog.records)


def test_no_share_head_refuses_the_head(runner):
    """--no-share-head: /v1/head is a 403 and /v1/model says the head is not shared."""
    with serve(runner, share_head=False) as client:
        error = assert_error(client.get("/v1/head"), 403, "head_not_shared")
        assert "does not share" in error.message
        assert client.get("/v1/model").json()["head_shared"] is False


def test_shared_head_is_served(client):
    """By default the head is served as safetensors bytes and /v1/model says so."""
    response = client.get("/v1/head", headers=bearer(ALICE))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert client.get("/v1/model", headers=bearer(ALICE)).json()["head_shared"] is True


def test_keys_file_sets_token_quotas(tmp_path):
    """``tokens_per_minute=N`` after a key gives that key a quota; other keys have none."""
    path = tmp_path / "keys"
    path.write_text(f"{hash_key(ALICE)} alice tokens_per_minute=500\n{hash_key(BOB)}\n")
    assert ApiKeys.from_file(path).quotas == {"alice": 500}


@pytest.mark.parametrize("option", ["tokens_per_minute=0", "tokens_per_minute=x", "rate=5"])
def test_keys_file_refuses_a_bad_option(runner, tmp_path, option):
    path = tmp_path / "keys"
    path.write_text(f"{hash_key(ALICE)} alice\n{hash_key(BOB)} bob {option}\n")
    with pytest.raises(ValueError, match="tokens_per_minute=N") as raised:
        create_app(Settings(api_keys_file=path), runner=runner)
    assert f"{path}:2:" in str(raised.value)
