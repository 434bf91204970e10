"""The work behind the routes: validation against the model's limits, coalesced representation,
and generation sessions. Model work runs on one dedicated thread, off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from plm_owner_server.batcher import Coalescer
from plm_owner_server.errors import ApiError
from plm_owner_server.metrics import Metrics
from plm_owner_server.runner import Logits, ModelRunner
from plm_owner_server.sessions import Session, SessionStore
from plm_owner_server.settings import Settings
from shared.codec import TORCH_DTYPES, encode_tensor
from shared.protocol import (
    HiddenDType,
    LogitsMode,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
    TopK,
    WireTensor,
)

T = TypeVar("T")


class ModelThread:
    """One thread owns the model: work is serialised there and never blocks the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pema-model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def check_sequences(
    sequences: Sequence[Sequence[int]], runner: ModelRunner, settings: Settings
) -> None:
    """Refuse batches, lengths and token ids the model or the owner's limits do not allow."""
    if len(sequences) > settings.max_batch_size:
        raise ApiError(
            413,
            "batch_too_large",
            f"{len(sequences)} sequences in one request; the limit is {settings.max_batch_size}, "
            "so split the batch",
        )
    total = sum(map(len, sequences))
    if total > settings.max_request_tokens:
        raise ApiError(
            413,
            "too_many_tokens",
            f"{total} tokens in one request; the limit is {settings.max_request_tokens}, "
            "so split the batch",
        )
    for b, seq in enumerate(sequences):
        if len(seq) > runner.max_positions:
            raise ApiError(
                422,
                "sequence_too_long",
                f"sequence {b} has {len(seq)} tokens; the model's context is "
                f"{runner.max_positions}, so truncate it",
            )
        check_token_ids(seq, runner, f"sequence {b}")


def check_token_ids(ids: Sequence[int], runner: ModelRunner, where: str) -> None:
    top = max(ids)
    if top >= runner.vocab_size:
        raise ApiError(
            422,
            "token_out_of_range",
            f"{where} holds token id {top}; ids must be in [0, {runner.vocab_size}) — "
            "tokenize with the server's tokenizer (GET /v1/tokenizer)",
        )


def check_logits(mode: LogitsMode, positions: int, runner: ModelRunner, settings: Settings) -> None:
    if mode == "none":
        return
    per_position = runner.vocab_size if mode == "full" else min(mode, runner.vocab_size)
    if positions * per_position > settings.max_logits_values:
        raise ApiError(
            413,
            "logits_too_large",
            f"{positions} positions × {per_position} logits exceed the server's limit of "
            f"{settings.max_logits_values} values; ask for top-k logits or fewer positions",
        )


def encode_hidden(hidden: torch.Tensor, dtype: HiddenDType) -> WireTensor:
    return encode_tensor(hidden.to(TORCH_DTYPES[dtype]))


def encode_logits(logits: Logits | None, dtype: HiddenDType) -> WireTensor | TopK | None:
    if logits is None:
        return None
    if isinstance(logits, tuple):
        values, indices = logits
        return TopK(values=encode_hidden(values, dtype), indices=encode_tensor(indices))
    return encode_hidden(logits, dtype)


class Representer:
    """``/v1/represent``: validates, then coalesces concurrent requests into shared passes."""

    def __init__(
        self, runner: ModelRunner, settings: Settings, thread: ModelThread, metrics: Metrics
    ) -> None:
        self.runner, self.settings, self.thread, self.metrics = runner, settings, thread, metrics
        self.coalescer: Coalescer[RepresentRequest, RepresentResponse] = Coalescer(
            self._run_batch, settings.max_batch_tokens
        )

    async def represent(self, request: RepresentRequest) -> RepresentResponse:
        check_sequences(request.sequences, self.runner, self.settings)
        positions = sum(
            len(s) - b for s, b in zip(request.sequences, request.starts(), strict=True)
        )
        check_logits(request.logits, positions, self.runner, self.settings)
        return await self.coalescer.submit(request, sum(map(len, request.sequences)))

    async def _run_batch(self, requests: Sequence[RepresentRequest]) -> list[RepresentResponse]:
        self.metrics.batch_requests.observe(len(requests))
        return await self.thread.run(self._forward, requests)

    def _forward(self, requests: Sequence[RepresentRequest]) -> list[RepresentResponse]:
        rows = [seq for r in requests for seq in r.sequences]
        starts = [s for r in requests for s in r.starts()]
        hidden = self.runner.represent(rows, starts, self.settings.max_batch_tokens)
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.tokens.inc(sum(map(len, rows)))
        responses, first = [], 0
        for r in requests:
            parts = hidden[first : first + len(r.sequences)]
            first += len(r.sequences)
            responses.append(self._respond(r, parts))
        return responses

    @torch.inference_mode()
    def _respond(
        self, request: RepresentRequest, parts: Sequence[torch.Tensor]
    ) -> RepresentResponse:
        hidden = torch.cat(list(parts))
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        logits = None if request.logits == "none" else self.runner.logits(hidden, request.logits)
        return RepresentResponse(
            hidden=encode_hidden(hidden, request.dtype),
            offsets=offsets,
            logits=encode_logits(logits, request.dtype),
            fingerprint=self.runner.fingerprint,
        )


class SessionService:
    """``/v1/sessions``: open, step and close KV-cached decoding sessions."""

    def __init__(
        self, runner: ModelRunner, settings: Settings, thread: ModelThread, metrics: Metrics
    ) -> None:
        self.runner, self.settings, self.thread, self.metrics = runner, settings, thread, metrics
        self._evicted_seen = 0
        self.store = SessionStore(
            settings.session_ttl_s,
            settings.max_sessions_per_key,
            settings.max_kv_cache_bytes,
            on_change=self._observe,
        )

    def _observe(self, store: SessionStore) -> None:
        self.metrics.sessions.set(len(store))
        self.metrics.kv_bytes.set(store.nbytes)
        self.metrics.evictions.inc(store.evicted - self._evicted_seen)
        self._evicted_seen = store.evicted

    async def open(self, owner: str, request: SessionOpenRequest) -> SessionOpenResponse:
        check_sequences(request.sequences, self.runner, self.settings)
        check_logits(request.logits, len(request.sequences), self.runner, self.settings)
        return await self.thread.run(self._open, owner, request)

    def _open(self, owner: str, request: SessionOpenRequest) -> SessionOpenResponse:
        width = max(map(len, request.sequences))
        self.store.check_room(
            owner, self.runner.kv_bytes_per_token * width * len(request.sequences)
        )
        state, hidden = self.runner.open_session(request.sequences)
        session = Session(owner, state, request.dtype, prompt_len=width)
        self.store.add(session)
        self.metrics.tokens.inc(sum(map(len, request.sequences)))
        return SessionOpenResponse(
            session_id=session.id,
            hidden=encode_hidden(hidden, request.dtype),
            logits=encode_logits(self._logits(hidden, request.logits), request.dtype),
            fingerprint=self.runner.fingerprint,
        )

    async def step(
        self, owner: str, session_id: str, request: SessionStepRequest
    ) -> SessionStepResponse:
        check_token_ids(request.tokens, self.runner, "tokens")
        check_logits(request.logits, len(request.tokens), self.runner, self.settings)
        return await self.thread.run(self._step, owner, session_id, request)

    def _step(
        self, owner: str, session_id: str, request: SessionStepRequest
    ) -> SessionStepResponse:
        session = self.store.get(session_id, owner)
        rows = request.rows if request.rows is not None else session.state.rows
        self._check_step(session, rows, request.tokens)
        hidden = self.runner.step_session(session.state, rows, request.tokens)
        session.steps += 1
        self.store.update(session)
        self.metrics.tokens.inc(len(rows))
        return SessionStepResponse(
            hidden=encode_hidden(hidden, session.dtype),
            logits=encode_logits(self._logits(hidden, request.logits), session.dtype),
        )

    def _check_step(self, session: Session, rows: Sequence[int], tokens: Sequence[int]) -> None:
        if len(rows) != len(tokens):
            raise ApiError(
                422,
                "invalid_request",
                f"{len(tokens)} tokens for {len(rows)} live rows; send one token per row, "
                "or list the rows",
            )
        live = set(session.state.rows)
        if dead := [r for r in rows if r not in live]:
            raise ApiError(
                422,
                "row_not_live",
                f"rows {dead} are not live in this session (live: {sorted(live)}); a row left "
                "out of a step is finished",
            )
        if session.steps >= self.settings.max_new_tokens:
            raise ApiError(
                422,
                "max_new_tokens",
                f"this session reached the server's limit of {self.settings.max_new_tokens} "
                "steps; close it",
            )
        if session.prompt_len + session.steps >= self.runner.max_positions:
            raise ApiError(
                422,
                "context_full",
                f"this session filled the model's context of {self.runner.max_positions} tokens",
            )

    def _logits(self, hidden: torch.Tensor, mode: LogitsMode) -> Logits | None:
        return None if mode == "none" else self.runner.logits(hidden, mode)

    async def close(self, owner: str, session_id: str) -> None:
        await self.thread.run(self.store.remove, session_id, owner)

    async def expire(self) -> int:
        return await self.thread.run(self.store.expire)
