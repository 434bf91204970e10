"""The work behind ``pema-client serve``'s routes: a request's prompts as token ids, its job on
its model's :class:`~.engine.Engine`, and the answer, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from data_owner_client.constraints import GrammarError
from data_owner_client.data import PLACEHOLDER, source_length
from data_owner_client.decoding import Mixing, TokenLogprob
from data_owner_client.generate import EmptyPrompt, Job, PromptTooLong, Row
from data_owner_client.serve.engine import EngineClosed
from data_owner_client.serve.errors import (
    BadRequestError,
    ContextLengthExceededError,
    EmptyPromptError,
    ModelNotFoundError,
    NoChatTemplateError,
    OpenAIError,
    UnavailableError,
    as_openai_error,
)
from data_owner_client.serve.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from data_owner_client.serve.metrics import ServeMetrics
from data_owner_client.serve.models import ServedAdapter
from data_owner_client.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorResponse,
    FinishReason,
    ModelList,
    Sampling,
    Usage,
)

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a waiting request checks that its client is still there
FINISH: dict[str, FinishReason] = {"eos": "stop", "stop": "stop", "length": "length"}


class OpenAIServing:
    """The served models and their metrics; answers completions and chat completions."""

    def __init__(self, models: Sequence[ServedAdapter], metrics: ServeMetrics) -> None:
        self.models = {model.id: model for model in models}
        self.metrics = metrics

    def model(self, name: str) -> ServedAdapter:
        """The model called ``name``, or a 404 listing the others."""
        if name not in self.models:
            listed = ", ".join(self.models)
            message = f"model {name!r} does not exist; GET /v1/models lists {listed}"
            raise ModelNotFoundError(message, param="model")
        return self.models[name]

    def list_models(self) -> ModelList:
        return ModelList(data=[model.card() for model in self.models.values()])

    async def completion(self, body: CompletionRequest, request: Request) -> Any:
        """The completion of each prompt, whole or streamed; with ``echo``, after the prompt
        (scored when ``logprobs`` asks: one representation pass over it)."""
        model = self.model(body.model)
        refuse(body)
        prompts, sources = await asyncio.to_thread(completion_prompts, model, body)
        if body.max_tokens == 0:  # scoring alone: nothing to decode
            check_context(model, prompts)
            scored = await asyncio.to_thread(echoed, model, body, prompts)
            return echo_only(model, body, scored, sum(map(len, prompts)))
        job = await asyncio.to_thread(self.job, model, body, prompts, sources, body.max_tokens)
        echoes = await asyncio.to_thread(echoed, model, body, prompts) if body.echo else None
        run = self.submit(model, body, job, prompts, echoes)
        return await run.respond(request, completion=True)

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        """The chat's next assistant message, whole or streamed."""
        model = self.model(body.model)
        refuse(body)
        prompt, source = await asyncio.to_thread(chat_prompt, model, body)
        job = await asyncio.to_thread(
            self.job, model, body, [prompt], [source], body.max_new_tokens, "messages"
        )
        run = self.submit(model, body, job, [prompt])
        return await run.respond(request, completion=False)

    @staticmethod
    def job(
        model: ServedAdapter,
        body: Sampling,
        prompts: list[list[int]],
        sources: list[int],
        max_tokens: int | None,
        param: str = "prompt",
    ) -> Job:
        """The request's job (``n`` rows per prompt; a grammar's matchers are built here, off
        the event loop); ``param`` names the prompts' field in errors."""
        generator = model.generator
        try:
            config = body.generation_config(
                generator.config, max_tokens or generator.max_new_tokens
            )
            return generator.job(prompts, sources, config, copies=body.n)
        except PromptTooLong as exc:
            raise ContextLengthExceededError(str(exc), param) from exc
        except EmptyPrompt as exc:
            raise EmptyPromptError(str(exc), param) from exc
        except GrammarError as exc:
            raise BadRequestError(str(exc), "response_format", "invalid_schema") from exc
        except ValueError as exc:  # settings that do not go together
            raise BadRequestError(str(exc)) from exc

    def submit(
        self,
        model: ServedAdapter,
        body: Sampling,
        job: Job,
        prompts: list[list[int]],
        echoes: list[Echo] | None = None,
    ) -> Run:
        """``job`` handed to the model's engine, and the run that answers it."""
        run = Run(model, body, job, sum(len(p) for p in prompts), self.metrics, echoes)
        try:
            model.engine.submit(job, run.notify)
        except ValueError as exc:
            raise BadRequestError(str(exc), "prompt") from exc
        except EngineClosed as exc:
            raise UnavailableError(str(exc)) from exc
        return run


def refuse(body: Sampling) -> None:
    """Refuse a request with a field this service cannot honour, naming it in ``param``."""
    for param, message, code in body.refusals():
        raise BadRequestError(message, param, code)


def check_context(model: ServedAdapter, prompts: list[list[int]]) -> None:
    """Refuse a prompt to score that is longer than the model reads."""
    info = model.generator.served.info
    limit = min(info.max_positions, info.limits.max_request_tokens)
    for index, prompt in enumerate(prompts):
        if len(prompt) > limit:
            raise ContextLengthExceededError(
                f"prompt {index} has {len(prompt)} tokens; the model reads at most {limit}",
                "prompt",
            )


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


def completion_prompts(
    model: ServedAdapter, body: CompletionRequest
) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids and its source's length in tokens (token ids are read as their
    text: the horizon is the same)."""
    tokenizer, vocab = model.generator.served.tokenizer, model.generator.served.info.vocab_size
    prompts, sources = [], []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            prompts.append(list(tokenizer(prompt)["input_ids"]))
            sources.append(source_length(tokenizer, source_of(model.template, prompt)))
        else:
            if any(token >= vocab for token in prompt):
                raise BadRequestError(f"token ids must be below {vocab}", param="prompt")
            prompts.append(prompt)
            text = tokenizer.decode(prompt, skip_special_tokens=True)  # as a text prompt would
            sources.append(source_length(tokenizer, source_of(model.template, text)))
    return prompts, sources


def chat_prompt(model: ServedAdapter, body: ChatRequest) -> tuple[list[int], int]:
    """The chat rendered by the model's chat template, as token ids, and the length in tokens of
    its source: the last user message."""
    tokenizer = model.generator.served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"the model behind {model.id!r} has no chat template; send the prompt to "
            "/v1/completions instead",
            param="messages",
        )
    messages = [{**m.model_dump(exclude={"content"}), "content": m.text} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    users = [m.text for m in body.messages if m.role == "user"]
    return prompt, source_length(tokenizer, users[-1] if users else text)


@dataclass
class Echo:
    """An echoed prompt: its text, its first token and the others' log-probabilities (when
    asked for)."""

    text: str
    first: int
    scored: list[TokenLogprob]


def echoed(model: ServedAdapter, body: CompletionRequest, prompts: list[list[int]]) -> list[Echo]:
    """Each prompt as the answer echoes it, scored by the mixture the request decodes with."""
    generator = model.generator
    try:
        config = body.generation_config(generator.config, generator.max_new_tokens)
        mixing = Mixing.resolve(config, generator.defaults)
    except ValueError as exc:  # settings that do not go together
        raise BadRequestError(str(exc)) from exc
    scored: list[list[TokenLogprob]] = [[] for _ in prompts]
    if body.logprobs is not None:
        try:
            scored = generator.score(prompts, mixing, body.logprobs)
        except Exception as exc:  # the PLM owner's server refused or failed
            raise as_openai_error(exc) from exc
    tokenizer = generator.served.tokenizer
    return [
        Echo(given if isinstance(given, str) else tokenizer.decode(given), prompt[0], logprobs)
        for given, prompt, logprobs in zip(body.prompts, prompts, scored, strict=True)
    ]


def echo_only(
    model: ServedAdapter, body: CompletionRequest, echoes: list[Echo], prompt_tokens: int
) -> Any:
    """``max_tokens: 0``: the prompts and their log-probabilities, ``n`` choices each."""
    texts = TokenTexts(model.generator.served.tokenizer)
    choices = [
        CompletionChoice(
            index=i,
            text=echo.text,
            finish_reason="length",
            logprobs=None
            if body.logprobs is None
            else completion_logprobs(texts, echo.scored, echo.first),
        )
        for i, echo in enumerate(e for e in echoes for _ in range(body.n))
    ]
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)
    answer = Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.id, choices=choices
    )
    if not body.stream:
        return answer.model_copy(update={"usage": usage})

    async def chunks() -> AsyncIterator[BaseModel]:
        yield answer
        if body.include_usage:
            yield answer.model_copy(update={"choices": [], "usage": usage})

    return StreamingResponse(_sse(chunks()), media_type="text/event-stream")


# ---- decoding ----------------------------------------------------------------------------------


@dataclass
class Snapshot:
    texts: list[str]  # each row's text so far that will stay (all of it once finished)
    finish: list[FinishReason | None]  # each row's OpenAI finish reason, once finished
    tokens: list[int]  # each row's new tokens so far (and log-probabilities, when asked for)
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
        echoes: list[Echo] | None = None,
    ) -> None:
        self.model, self.body, self.job, self.prompt_tokens = model, body, job, prompt_tokens
        self.metrics, self.arrived = metrics, time.perf_counter()
        self.loop = asyncio.get_running_loop()
        self.latest: Snapshot | None = None
        self.changed = asyncio.Event()
        self.id, self.created = uuid.uuid4().hex, int(time.time())
        self.echoes = echoes  # completions' echo: one per prompt
        self.texts = TokenTexts(model.generator.served.tokenizer)
        self.logprobs = body.top_logprobs_count is not None

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

    def _scored(self, row: int, start: int, end: int) -> list[TokenLogprob]:
        """Choice ``row``'s new tokens ``[start, end)``' log-probabilities (EOS included, as its
        usage counts it; the engine only appends to them), when asked for."""
        return self.job.rows[row].logprobs[start:end] if self.logprobs else []

    def _lead(self, row: int, tokens: int) -> str:
        """The whitespace choice ``row``'s first ``tokens`` begin with: stripped from its text,
        it stays between an echoed prompt and the completion."""
        new = self.job.rows[row].tokens[:tokens]
        text = self.model.generator.served.tokenizer.decode(new, skip_special_tokens=True)
        return text[: len(text) - len(text.lstrip())] if text.strip() else ""

    def _echo(self, row: int) -> Echo | None:
        """The echoed prompt of choice ``row``, if any (``n`` choices per prompt)."""
        return None if self.echoes is None else self.echoes[row // self.body.n]

    def _completion_logprobs(
        self, row: int, scored: list[TokenLogprob], offset: int, echo: bool
    ) -> CompletionLogprobs | None:
        """Choice ``row``'s ``scored`` tokens (after its echoed prompt's with ``echo``)."""
        if not self.logprobs:
            return None
        first, prompt = None, self._echo(row) if echo else None
        if prompt is not None:
            first, scored = prompt.first, prompt.scored + scored
        return completion_logprobs(self.texts, scored, first, offset)

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
                    raise as_openai_error(snapshot.error)
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
        """The answer: a stream of chunks when asked for, else the whole of it once done."""
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
        return self._whole(last, completion)

    def _whole(self, last: Snapshot, completion: bool) -> Completion | ChatCompletion:
        """The finished answer of ``last``, the job's final snapshot."""
        base = self._base(completion)
        rows = list(zip(last.texts, last.finish, last.tokens, strict=True))
        if completion:
            choices = [
                CompletionChoice(
                    index=i,
                    text=(echo.text + self._lead(i, n) if (echo := self._echo(i)) else "") + text,
                    finish_reason=reason,
                    logprobs=self._completion_logprobs(i, self._scored(i, 0, n), 0, echo=True),
                )
                for i, (text, reason, n) in enumerate(rows)
            ]
            return Completion(**base, choices=choices, usage=self.usage(last))
        return ChatCompletion(
            **base,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=text),
                    finish_reason=reason or "stop",
                    logprobs=chat_logprobs(self.texts, self._scored(i, 0, n))
                    if self.logprobs
                    else None,
                )
                for i, (text, reason, n) in enumerate(rows)
            ],
            usage=self.usage(last),
        )

    async def _chunks(
        self, snapshots: AsyncIterator[Snapshot], completion: bool
    ) -> AsyncIterator[BaseModel]:
        """The stream's chunks: an echoed prompt first, then each row's new text as it becomes
        final (and its new tokens' log-probabilities), its finish reason with its last text, then
        the usage when asked for."""
        base = self._base(completion)
        chunk: Callable[..., BaseModel] = Completion if completion else ChatChunk
        rows = len(self.job.rows)
        offsets = [0] * rows  # completions' text offsets: where each row's next token starts
        if not completion:
            roles = [
                ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                for i in range(rows)
            ]
            yield ChatChunk(**base, choices=roles)
        elif self.echoes is not None:
            echoes = []
            for i in range(rows):
                echo = self._echo(i)
                assert echo is not None
                logprobs = self._completion_logprobs(i, [], 0, echo=True)
                offsets[i] = sum(map(len, logprobs.tokens)) if logprobs else 0
                echoes.append(
                    CompletionChoice(index=i, text=echo.text, finish_reason=None, logprobs=logprobs)
                )
            yield Completion(**base, choices=echoes)
        sent, done, scored = [""] * rows, [False] * rows, [0] * rows
        last = None
        async for snapshot in snapshots:
            last = snapshot
            choices: list[Any] = []
            for i, (text, reason) in enumerate(zip(snapshot.texts, snapshot.finish, strict=True)):
                delta = "" if done[i] else _extension(sent[i], text)
                new = [] if done[i] else self._scored(i, scored[i], snapshot.tokens[i])
                if done[i] or not (delta or reason or new):
                    continue
                first = self.echoes is not None and delta and not sent[i]
                lead = self._lead(i, snapshot.tokens[i]) if first else ""
                sent[i], done[i] = sent[i] + delta, reason is not None
                delta = lead + delta  # after an echoed prompt, the output's leading space
                scored[i] += len(new)
                if completion:
                    logprobs = self._completion_logprobs(i, new, offsets[i], echo=False)
                    offsets[i] += sum(map(len, logprobs.tokens)) if logprobs else 0
                    choices.append(
                        CompletionChoice(
                            index=i, text=delta, finish_reason=reason, logprobs=logprobs
                        )
                    )
                else:
                    choices.append(
                        ChatChunkChoice(
                            index=i,
                            delta=Delta(content=delta),
                            finish_reason=reason,
                            logprobs=chat_logprobs(self.texts, new) if self.logprobs else None,
                        )
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
