"""Safe by default: no open server beyond loopback, request ids in headers, bodies and the log
(which names routes, never paths or bodies), and TLS."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from data_owner_client.client import PemaClient
from plm_owner_server.app import create_app
from plm_owner_server.settings import Settings
from shared.protocol import RepresentRequest, SessionOpenRequest, SessionOpenResponse
from tests.server.helpers import answer, assert_error, post, serve
from tests.uvicorn_server import free_port


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "pema.example.org"])
def test_no_keys_beyond_loopback_is_refused(runner, host):
    with pytest.raises(ValueError, match="--insecure-no-auth") as refused:
        create_app(Settings(host=host), runner=runner)
    assert "hash-key" in str(refused.value)
    create_app(Settings(host=host, insecure_no_auth=True), runner=runner)  # the owner's choice


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_no_keys_on_loopback_is_allowed(runner, host):
    create_app(Settings(host=host), runner=runner)


def test_request_ids_in_headers_error_bodies_and_the_log(runner, caplog):
    """Each response has an id (the caller's when sane); errors carry it; the log line has it,
    the route template and the status, and no session id or token ids."""
    with serve(runner) as client, caplog.at_level(logging.INFO, logger="pema.access"):
        opened = answer(
            post(client, "/v1/sessions", SessionOpenRequest(sequences=[[71, 72, 73]])),
            SessionOpenResponse,
            status=201,
        )
        ok = post(client, "/v1/represent", RepresentRequest(sequences=[[88, 89]]))
        mine = post(
            client, "/v1/represent", {"sequences": []}, headers={"x-request-id": "job-42.a"}
        )
        odd = post(client, "/v1/represent", {"sequences": []}, headers={"x-request-id": "a b\n"})
        missing = client.delete(f"/v1/sessions/{opened.session_id}x")
    assert len(ok.headers["x-request-id"]) == 16
    assert assert_error(mine, 422, "invalid_request").request_id == "job-42.a"
    assert assert_error(odd, 422, "invalid_request").request_id not in ("a b\n", None)
    assert_error(missing, 404, "session_not_found")
    lines = [r.getMessage() for r in caplog.records if r.name == "pema.access"]
    for response in (ok, mine, odd, missing):
        rid = response.headers["x-request-id"]
        assert any(line.startswith(f"{rid} ") for line in lines), (rid, lines)
    assert any("POST /v1/represent 200" in line for line in lines)
    assert any("DELETE /v1/sessions/{session_id} 404" in line for line in lines)
    ours = ("pema", "plm_owner_server", "uvicorn")  # not the test client's httpx, which logs URLs
    everything = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(ours))
    assert opened.session_id not in everything
    assert "88, 89" not in everything and "71, 72, 73" not in everything  # no token ids


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a certificate")
def test_tls_with_a_self_signed_certificate(tmp_path):
    """`pema-server --ssl-certfile --ssl-keyfile` serves HTTPS; a client that trusts the
    certificate (`--ca-cert`, `PEMA_CA_CERT`) connects, one that does not is refused."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    command = [
        sys.executable, "-m", "plm_owner_server", "--port", str(port), "--log-level", "warning",
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/v1/health", verify=str(cert)).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/health")  # not trusted
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health")  # no plain HTTP
        with PemaClient(url, ca_cert=cert) as client:
            assert client.model_info().model_id
        with PemaClient(url, retries=0) as client, pytest.raises(httpx.ConnectError):
            client.model_info()  # the system's CAs do not know it
    finally:
        server.terminate()
        server.wait(timeout=30)
