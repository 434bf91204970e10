"""One HTTP client over the `/v1` protocol: keep-alive, timeouts, retries with backoff on
connection errors, 429 and 503 (never on other 4xx)."""

from __future__ import annotations

import io
import itertools
import os
import ssl
import time
import zipfile
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch
from pydantic import BaseModel

from shared.codec import decode_tensor, pack, unpack
from shared.head import Head
from shared.protocol import (
    MSGPACK,
    ErrorResponse,
    HiddenDType,
    Limits,
    LogitsMode,
    ModelInfo,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
    TopK,
    WireTensor,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
R = TypeVar("R")
RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 60.0
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # never reached the server
Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


class ServerError(RuntimeError):
    """A 4xx/5xx answer, with the server's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"server answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Represented:
    hidden: torch.Tensor  # [N, d]
    offsets: list[int]  # row b is hidden[offsets[b]:offsets[b + 1]]
    logits: Logits
    fingerprint: str

    def rows(self) -> list[torch.Tensor]:
        return [self.hidden[a:b] for a, b in zip(self.offsets, self.offsets[1:], strict=False)]


def _logits(wire: WireTensor | TopK | None) -> Logits:
    if wire is None:
        return None
    if isinstance(wire, TopK):
        return decode_tensor(wire.values), decode_tensor(wire.indices)
    return decode_tensor(wire)


class PemaClient:
    """A `pema-server` at ``base_url`` (default ``PEMA_SERVER``), key from ``PEMA_API_KEY``; an
    https server's certificate is checked against ``ca_cert`` (default ``PEMA_CA_CERT``), else the
    system's CAs."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        http: httpx.Client | None = None,
        ca_cert: str | Path | None = None,
    ) -> None:
        """``http`` replaces the connection (tests pass a FastAPI ``TestClient``)."""
        api_key = api_key or os.environ.get("PEMA_API_KEY")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        if http is None:
            base_url = base_url or os.environ.get("PEMA_SERVER")
            if not base_url:
                raise ValueError("no server given: pass --server URL or set PEMA_SERVER")
            ca_cert = ca_cert or os.environ.get("PEMA_CA_CERT")
            verify: ssl.SSLContext | bool = True
            if ca_cert:
                verify = ssl.create_default_context(cafile=str(ca_cert))
            http = httpx.Client(
                base_url=base_url.rstrip("/"),
                timeout=httpx.Timeout(timeout, connect=10.0),
                verify=verify,
            )
        http.headers.update(headers)
        self._http = http
        self.retries, self.backoff = retries, backoff

    def __enter__(self) -> PemaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, path: str, body: BaseModel | None = None, idempotent: bool = True
    ) -> httpx.Response:
        """Send a request, retrying 429/503 (after the server's ``Retry-After``, up to a minute,
        when it sends one) and transport errors with backoff. A request that changes state
        (``idempotent=False``: opening or stepping a session) is resent only when it never
        reached the server: a read error after sending could mean it was done once."""
        headers = {"accept": MSGPACK}
        content = None
        if body is not None:
            content, headers["content-type"] = pack(body), MSGPACK
        for attempt in range(self.retries + 1):
            last, delay = attempt == self.retries, self.backoff * 2**attempt
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                if last or not (idempotent or isinstance(exc, UNSENT)):
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or last:
                    _raise_for_error(response)
                    return response
                delay = max(delay, _retry_after(response))
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None,
        model: type[M],
        idempotent: bool = True,
    ) -> M:
        return unpack(self._request(method, path, body, idempotent).content, model)

    def health(self) -> bool:
        try:
            return self._http.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate_json(self._request("GET", "/v1/model").content)

    def head(self) -> Head:
        """The server's output head as a torch module (403 if the owner does not share it)."""
        return Head.from_bytes(self._request("GET", "/v1/head").content)

    def head_bytes(self) -> bytes:
        return self._request("GET", "/v1/head").content

    def download_tokenizer(self, folder: str | Path) -> Path:
        """Extract the tokenizer files into ``folder`` (load it with AutoTokenizer)."""
        data = self._request("GET", "/v1/tokenizer").content
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            archive.extractall(folder)
        return folder

    def represent(
        self,
        sequences: Sequence[Sequence[int]],
        start: Sequence[int] | None = None,
        dtype: HiddenDType = "float32",
        logits: LogitsMode = "none",
    ) -> Represented:
        request = RepresentRequest(
            sequences=[list(s) for s in sequences],
            start=list(start) if start is not None else None,
            dtype=dtype,
            logits=logits,
        )
        r = self._call("POST", "/v1/represent", request, RepresentResponse)
        return Represented(decode_tensor(r.hidden), r.offsets, _logits(r.logits), r.fingerprint)

    def open_session(
        self,
        sequences: Sequence[Sequence[int]],
        dtype: HiddenDType = "float32",
        logits: LogitsMode = "none",
    ) -> tuple[str, torch.Tensor, Logits]:
        """Prefill prompts; returns (session id, last representation per row [B, d], logits)."""
        request = SessionOpenRequest(
            sequences=[list(s) for s in sequences], dtype=dtype, logits=logits
        )
        r = self._call("POST", "/v1/sessions", request, SessionOpenResponse, idempotent=False)
        return r.session_id, decode_tensor(r.hidden), _logits(r.logits)

    def open_reading(
        self, sequences: Sequence[Sequence[int]], dtype: HiddenDType = "float32"
    ) -> tuple[str, list[torch.Tensor]]:
        """Prefill prompts and read every prompt position from the same pass: (session id,
        each row's representations ``[len, d]``)."""
        request = SessionOpenRequest(
            sequences=[list(s) for s in sequences], dtype=dtype, positions="all"
        )
        r = self._call("POST", "/v1/sessions", request, SessionOpenResponse, idempotent=False)
        hidden, offsets = decode_tensor(r.hidden), r.offsets
        if offsets is None or len(offsets) != len(sequences) + 1 or offsets[-1] != len(hidden):
            raise RuntimeError(f"the server sent {len(hidden)} positions and offsets {offsets}")
        return r.session_id, [hidden[a:b] for a, b in itertools.pairwise(offsets)]

    def step(
        self,
        session_id: str,
        tokens: Sequence[int],
        rows: Sequence[int] | None = None,
        logits: LogitsMode = "none",
        parents: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, Logits]:
        """One token per listed row; returns their new representations [len(rows), d]. With
        ``parents``, row ``k`` continues a copy of live row ``parents[k]`` (see
        :class:`SessionStepRequest`)."""
        request = SessionStepRequest(
            tokens=list(tokens),
            rows=list(rows) if rows is not None else None,
            parents=list(parents) if parents is not None else None,
            logits=logits,
        )
        path = f"/v1/sessions/{session_id}/step"
        r = self._call("POST", path, request, SessionStepResponse, idempotent=False)
        return decode_tensor(r.hidden), _logits(r.logits)

    def close_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")


def _retry_after(response: httpx.Response) -> float:
    """The server's ``Retry-After`` in seconds (at most a minute), or 0."""
    try:
        return min(float(response.headers.get("retry-after", 0)), MAX_RETRY_AFTER_S)
    except ValueError:  # an HTTP date: rare from this server; fall back to the backoff
        return 0.0


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = ErrorResponse.model_validate_json(response.content).error
        code, message = error.code, error.message
    except ValueError:
        code, message = f"http_{response.status_code}", response.text[:500]
    raise ServerError(response.status_code, code, message)


def within_limits(
    items: Sequence[T], tokens: Callable[[T], int], limits: Limits
) -> Iterator[list[T]]:
    """``items`` in order, in requests of at most the server's ``max_batch_size`` items and
    ``max_request_tokens`` tokens (``tokens``: an item's; a larger item goes alone)."""
    part: list[T] = []
    for item in items:
        spent = sum(map(tokens, part)) + tokens(item)
        if part and (len(part) == limits.max_batch_size or spent > limits.max_request_tokens):
            yield part
            part = []
        part.append(item)
    if part:
        yield part


def pipelined(
    fn: Callable[[T], R],
    items: Sequence[T],
    cost: Callable[[T], int],
    window: int,
    max_calls: int = 8,
) -> Generator[R, None, None]:
    """``fn(item)`` for each item, in order, with up to ``max_calls`` calls in flight and their
    summed cost within ``window`` (at least one call), so a server has the next request queued
    while it answers the last and while this process handles the answer. An error stops the
    rest and is raised."""
    pool = ThreadPoolExecutor(max_workers=max_calls, thread_name_prefix="pema-request")
    pending: deque[tuple[Future[R], int]] = deque()
    in_flight = 0
    try:
        for item in items:
            while pending and (in_flight + cost(item) > window or len(pending) == max_calls):
                future, spent = pending.popleft()
                in_flight -= spent
                yield future.result()
            pending.append((pool.submit(fn, item), cost(item)))
            in_flight += cost(item)
        while pending:
            yield pending.popleft()[0].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
