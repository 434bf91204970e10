"""The FastAPI app of ``pema-client serve``: OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streamed as server-sent events on request) over the data owner's
adapters, each decoded by :class:`~data_owner_client.generate.Generator` on an
:class:`~.engine.Engine`. Every 4xx/5xx has OpenAI's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from data_owner_client.client import ServerError
from data_owner_client.data import PLACEHOLDER, DataError, source_length
from data_owner_client.generate import Generator, Job, Row
from data_owner_client.serve.engine import Engine, EngineClosed
from data_owner_client.serve.metrics import ServeMetrics
from data_owner_client.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorInfo,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    Sampling,
    Usage,
)
from shared.keys import KeysFile, bearer_key

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a waiting request checks that its client is still there
FINISH: dict[str, FinishReason] = {"eos": "stop", "stop": "stop", "length": "length"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)


@dataclass
class ServedAdapter:
    """One model of ``/v1/models``: an adapter (or the PLM alone) and the engine decoding it."""

    id: str
    generator: Generator
    engine: Engine
    kind: str | None  # the adapter's kind; None for the PLM alone
    template: str | None  # the prompt template the adapter was trained with
    created: int


def create_app(models: Sequence[ServedAdapter], keys: KeysFile | None = None) -> FastAPI:
    """The app serving ``models`` (engines started and stopped with it); ``keys``: the bearer
    keys it accepts (None: open)."""
    by_id = {model.id: model for model in models}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models:
            model.engine.start()
        try:
            yield
        finally:
            for model in models:
                await asyncio.to_thread(model.engine.close)

    def authorize(request: Request) -> None:
        if keys is None:
            return
        key = bearer_key(request.headers.get("authorization", ""))
        if key is None or keys.owner_of(key) is None:
            raise OpenAIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' with a key of "
                "this service's keys file (not the PLM server's key)",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(
        title="pema-client serve",
        description="The data owner's adapted model behind an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    _error_handlers(app)
    metrics = ServeMetrics(models)
    metrics.install(app)

    def model_of(name: str) -> ServedAdapter:
        if name not in by_id:
            raise OpenAIError(
                404,
                f"model {name!r} does not exist; GET /v1/models lists {', '.join(by_id)}",
                param="model",
                code="model_not_found",
            )
        return by_id[name]

    def card(model: ServedAdapter) -> ModelCard:
        owner = "plm-owner" if model.kind is None else "data-owner"
        return ModelCard(
            id=model.id,
            created=model.created,
            owned_by=owner,
            adapter_kind=model.kind,
            template=model.template,
        )

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def list_models() -> ModelList:
        return ModelList(data=[card(model) for model in models])

    @app.get("/v1/models/{model}", dependencies=[Depends(authorize)])
    def get_model(model: str) -> ModelCard:
        return card(model_of(model))

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        model = model_of(body.model)
        prompts, sources = await asyncio.to_thread(_completion_prompts, model, body)
        run = _submit(model, body, prompts, sources, body.max_tokens, "prompt", metrics)
        return await run.respond(request, completion=True)

    @app.post(
        "/v1/chat/completions", dependencies=[Depends(authorize)], response_model=ChatCompletion
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        model = model_of(body.model)
        prompt, source = await asyncio.to_thread(_chat_prompt, model, body)
        run = _submit(model, body, [prompt], [source], body.max_new_tokens, "messages", metrics)
        return await run.respond(request, completion=False)

    return app


# ---- prompts -----------------------------------------------------------------------------------


def source_of(template: str | None, prompt: str) -> str:
    """The source text inside ``prompt`` when it is the adapter's ``template`` filled in, else
    the whole prompt: the Gradual Unrolling horizon counts the source's tokens."""
    if template is None or PLACEHOLDER not in template:
        return prompt
    before, after = template.split(PLACEHOLDER, 1)
    inside = len(prompt) >= len(before) + len(after)
    if inside and prompt.startswith(before) and prompt.endswith(after):
        return prompt[len(before) : len(prompt) - len(after)]
    return prompt


def _completion_prompts(
    model: ServedAdapter, body: CompletionRequest
) -> tuple[list[list[int]], list[int]]:
    tokenizer, vocab = model.generator.served.tokenizer, model.generator.served.info.vocab_size
    prompts, sources = [], []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            prompts.append(list(tokenizer(prompt)["input_ids"]))
            sources.append(source_length(tokenizer, source_of(model.template, prompt)))
        else:
            if any(token >= vocab for token in prompt):
                raise OpenAIError(400, f"token ids must be below {vocab}", param="prompt")
            prompts.append(prompt)
            sources.append(len(prompt))
    return prompts, sources


def _chat_prompt(model: ServedAdapter, body: ChatRequest) -> tuple[list[int], int]:
    tokenizer = model.generator.served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            400,
            f"the model behind {model.id!r} has no chat template; send the prompt to "
            "/v1/completions instead",
            param="messages",
            code="no_chat_template",
        )
    messages = [{**m.model_dump(exclude={"content"}), "content": m.text} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    users = [m.text for m in body.messages if m.role == "user"]
    return prompt, source_length(tokenizer, users[-1] if users else text)


# ---- decoding ----------------------------------------------------------------------------------


def _submit(
    model: ServedAdapter,
    body: Sampling,
    prompts: list[list[int]],
    sources: list[int],
    max_tokens: int | None,
    param: str,
    metrics: ServeMetrics,
) -> Run:
    """The request's job (``n`` rows per prompt), handed to the model's engine; ``param`` names
    the prompts' field in errors."""
    generator = model.generator
    try:
        config = dataclasses.replace(
            generator.config,
            max_new_tokens=max_tokens or generator.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed if body.seed is not None else secrets.randbits(62),
            stop=body.stops,
            no_repeat_ngram=body.no_repeat_ngram,
            min_length=body.min_length,
            lambda_max=body.lambda_max,
            lambda_min=body.lambda_min,
            schedule=body.schedule,
            gu_horizon=body.gu_horizon,
        )
        job = generator.job(prompts, sources, config, copies=body.n)
    except DataError as exc:
        code = "context_length_exceeded" if "no room" in str(exc) else "empty_prompt"
        raise OpenAIError(400, str(exc), param=param, code=code) from exc
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc
    run = Run(model, body, job, sum(len(p) for p in prompts), metrics)
    try:
        model.engine.submit(job, run.notify)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=param) from exc
    except EngineClosed as exc:
        raise OpenAIError(503, str(exc), type="server_error") from exc
    return run


@dataclass
class Snapshot:
    texts: list[str]  # each row's text so far that will stay (all of it once finished)
    finish: list[FinishReason | None]  # each row's OpenAI finish reason, once finished
    tokens: list[int]  # each row's new tokens so far
    error: Exception | None
    ended: bool


class Run:
    """One request's job: hears its steps on the engine's thread and answers the request on the
    event loop, whole or streamed. Only the latest snapshot is kept: a slow reader skips to it."""

    def __init__(
        self,
        model: ServedAdapter,
        body: Sampling,
        job: Job,
        prompt_tokens: int,
        metrics: ServeMetrics,
    ) -> None:
        self.model, self.body, self.job, self.prompt_tokens = model, body, job, prompt_tokens
        self.metrics, self.arrived = metrics, time.perf_counter()
        self.loop = asyncio.get_running_loop()
        self.latest: Snapshot | None = None
        self.changed = asyncio.Event()
        self.id, self.created = uuid.uuid4().hex, int(time.time())

    def notify(self, job: Job, error: Exception | None) -> None:
        """On the engine's thread: what the request needs of the job now."""
        ended = error is not None or job.finished
        if not (self.body.stream or ended):
            return
        snapshot = Snapshot(
            [self._visible(row) for row in job.rows],
            [FINISH.get(row.finish_reason or "") for row in job.rows],
            [len(row.tokens) for row in job.rows],
            error,
            ended,
        )
        self.loop.call_soon_threadsafe(self._publish, snapshot)

    def _publish(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        self.changed.set()

    def _visible(self, row: Row) -> str:
        """A row's text that later tokens cannot change: all of it once finished; before, without
        a half character or trailing whitespace (the final text is stripped), nor an ending
        that may begin a stop string."""
        if row.finish_reason is not None:
            return row.text
        stops = self.job.config.stop
        # With stop strings the generator keeps the text up to date; else it is decoded here.
        text = row.text if stops else self.model.generator.text(row.tokens)
        text = text.rstrip("\ufffd").rstrip()
        held = max(
            (k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])),
            default=0,
        )
        return text[: len(text) - held].rstrip()

    async def snapshots(self, request: Request) -> AsyncGenerator[Snapshot, None]:
        """The job's latest snapshots until it ends; its rows are cancelled if the client goes
        away (or stops reading)."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self.changed.wait(), POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("client went away; cancelling its %d rows", len(self.job.rows))
                        return
                    continue
                self.changed.clear()
                snapshot = self.latest
                assert snapshot is not None
                if snapshot.error is not None:
                    raise _failure(snapshot.error)
                if snapshot.ended:
                    self.metrics.tokens.labels(self.model.id).inc(sum(snapshot.tokens))
                yield snapshot
                if snapshot.ended:
                    return
        finally:
            self.job.cancelled = not self.job.finished

    def usage(self, snapshot: Snapshot) -> Usage:
        completion = sum(snapshot.tokens)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def _base(self, completion: bool) -> dict[str, Any]:
        """The fields every answer and chunk of this request shares."""
        kind = "cmpl" if completion else "chatcmpl"
        return {"id": f"{kind}-{self.id}", "created": self.created, "model": self.model.id}

    async def respond(self, request: Request, completion: bool) -> Any:
        if self.body.stream:
            snapshots = self.snapshots(request)
            # The first token (or the failure to open a session) comes before the status line,
            # so an unavailable PLM server is a 503, not an error event.
            first = await anext(snapshots, None)
            if first is None:
                return Response(status_code=499)  # the client went away
            waited = time.perf_counter() - self.arrived
            self.metrics.first_token.labels(self.model.id).observe(waited)
            chunks = self._chunks(_after(first, snapshots), completion)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        last = None
        async with contextlib.aclosing(self.snapshots(request)) as snapshots:
            async for snapshot in snapshots:
                last = snapshot
        if last is None or not last.ended:
            return Response(status_code=499)  # the client went away
        base = self._base(completion)
        rows = list(zip(last.texts, last.finish, strict=True))
        if completion:
            choices = [
                CompletionChoice(index=i, text=text, finish_reason=reason)
                for i, (text, reason) in enumerate(rows)
            ]
            return Completion(**base, choices=choices, usage=self.usage(last))
        return ChatCompletion(
            **base,
            choices=[
                ChatChoice(
                    index=i, message=AssistantMessage(content=text), finish_reason=reason or "stop"
                )
                for i, (text, reason) in enumerate(rows)
            ],
            usage=self.usage(last),
        )

    async def _chunks(
        self, snapshots: AsyncIterator[Snapshot], completion: bool
    ) -> AsyncIterator[BaseModel]:
        """The stream's chunks: each row's new text as it becomes final, its finish reason with
        its last text, then the usage when asked for."""
        base = self._base(completion)
        chunk: Callable[..., BaseModel] = Completion if completion else ChatChunk
        rows = len(self.job.rows)
        if not completion:
            roles = [
                ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                for i in range(rows)
            ]
            yield ChatChunk(**base, choices=roles)
        sent, done = [""] * rows, [False] * rows
        last = None
        async for snapshot in snapshots:
            last = snapshot
            choices: list[Any] = []
            for i, (text, reason) in enumerate(zip(snapshot.texts, snapshot.finish, strict=True)):
                delta = "" if done[i] else _extension(sent[i], text)
                if done[i] or not (delta or reason):
                    continue
                sent[i], done[i] = sent[i] + delta, reason is not None
                if completion:
                    choices.append(CompletionChoice(index=i, text=delta, finish_reason=reason))
                else:
                    choices.append(
                        ChatChunkChoice(index=i, delta=Delta(content=delta), finish_reason=reason)
                    )
            if choices:
                yield chunk(**base, choices=choices)
        if last is not None and last.ended and self.body.include_usage:
            yield chunk(**base, choices=[], usage=self.usage(last))


async def _after(first: Snapshot, rest: AsyncGenerator[Snapshot, None]) -> AsyncIterator[Snapshot]:
    """``first``, then ``rest``, which is closed when the stream ends or is cancelled."""
    yield first
    async with contextlib.aclosing(rest):
        async for snapshot in rest:
            yield snapshot


def _extension(sent: str, text: str) -> str:
    """What ``text`` adds to the ``sent`` prefix (nothing if it does not extend it)."""
    if text.startswith(sent):
        return text[len(sent) :]
    log.warning("a streamed text changed after it was sent: %r, then %r", sent, text)
    return ""


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events of ``chunks``, ending with ``[DONE]``; an error after the first chunk
    becomes an ``error`` event (the status line has gone out)."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except OpenAIError as exc:
        yield f"data: {ErrorResponse(error=exc.info).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


# ---- errors ------------------------------------------------------------------------------------


def _failure(exc: Exception) -> OpenAIError:
    """Why a job failed, as an answer: the PLM owner's server away or failing is a 503 (retry
    later), its refusal of the request a 400 (or its 429), anything else a 500."""
    if isinstance(exc, OpenAIError):
        return exc
    away = "the PLM owner's server is unavailable; retry when it is back"
    if isinstance(exc, httpx.TransportError) or (
        isinstance(exc, ServerError) and exc.status >= 500
    ):
        return OpenAIError(503, f"{away} ({exc})", type="server_error", code="plm_unavailable")
    if isinstance(exc, ServerError):
        if exc.status == 429:
            return OpenAIError(429, exc.message, type="rate_limit_error", code=exc.code)
        if exc.status in (401, 403):
            message = f"the PLM owner's server refused this service's key: {exc.message}"
            return OpenAIError(502, message, type="server_error", code=exc.code)
        return OpenAIError(400, exc.message, code=exc.code)
    if isinstance(exc, EngineClosed):
        return OpenAIError(503, str(exc), type="server_error")
    if isinstance(exc, RuntimeError) and isinstance(
        exc.__cause__, ServerError | httpx.TransportError
    ):
        return OpenAIError(503, f"{away} ({exc})", type="server_error", code="plm_unavailable")
    log.error("request failed", exc_info=exc)
    return OpenAIError(500, f"internal error: {exc}", type="server_error")


def _error_handlers(app: FastAPI) -> None:
    def answer(exc: OpenAIError) -> JSONResponse:
        body = ErrorResponse(error=exc.info).model_dump()
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    handlers: dict[Any, Callable[..., Any]] = {}

    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return answer(exc)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(loc) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        return answer(OpenAIError(400, f"invalid request: {message}", param=param))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = OpenAIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")
        return answer(error)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return answer(_failure(exc))

    handlers[OpenAIError] = openai_error
    handlers[RequestValidationError] = invalid
    handlers[StarletteHTTPException] = http_error
    handlers[Exception] = crash
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
