"""The OpenAI API's shapes that ``pema-client serve`` speaks: completions, chat completions (and
their streamed chunks), models and errors; PEMA's own settings are extra body fields."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_owner_client.constraints import json_grammar
from data_owner_client.schedule import SCHEDULES

if TYPE_CHECKING:
    from data_owner_client.generate import GenerationConfig

FinishReason = Literal["stop", "length"]
UNSUPPORTED = "is not supported by pema-client serve"
UNSUPPORTED_CODE, INVALID_CODE = "unsupported_parameter", "invalid_value"  # refusals' codes
MAX_STOPS = 32  # stop strings per request (OpenAI allows 4; lm-eval sends every one of a task's)
MAX_LOGPROBS = 20  # most likely tokens returned per position (OpenAI: 5 for completions, 20 chat)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # decoding always follows the schema


class ResponseFormat(Strict):
    """Plain text, any JSON object, or JSON following a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @property
    def grammar(self) -> str | None:
        """The grammar decoding follows (None: text)."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return json_grammar(schema if self.type == "json_schema" else None)


class Sampling(Strict):
    """What completions and chat completions share: OpenAI's sampling fields and PEMA's."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"end a choice at any of these strings (at most {MAX_STOPS})"
    )
    seed: int | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's fields that ask nothing of decoding: accepted and ignored.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # PEMA's settings; unset ones are the adapter's.
    lambda_max: float | None = Field(None, ge=0, le=1, description="PEMA's initial weight λ_0")
    lambda_min: float | None = Field(None, ge=0, le=1, description="floor of λ over the output")
    schedule: Literal[SCHEDULES] | None = Field(None, description="how λ decays")  # type: ignore[valid-type]
    gu_horizon: float | None = Field(None, gt=0, description="fixed GU horizon in tokens")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")
    no_repeat_ngram: int | None = Field(
        None,
        ge=0,
        description="never repeat an n-gram of the output (0: off; default: the adapter's)",
    )
    min_length: float = Field(
        0.0, ge=0, description="no end before this fraction of the output's expected length"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's fields are nullable: null asks for the default."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    def refusals(self) -> Iterator[tuple[str, str, str]]:
        """(field, why, code) of each field sent that this service cannot honour or that does
        not go with the others: the first is the answer's ``param``."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                yield name, f"{name} {UNSUPPORTED}; leave it at 0", UNSUPPORTED_CODE
        if self.logit_bias:
            yield "logit_bias", f"logit_bias {UNSUPPORTED}", UNSUPPORTED_CODE
        if self.stream_options is not None and not self.stream:
            yield "stream_options", "stream_options is only allowed with stream: true", INVALID_CODE
        form = self.response_format
        if form is not None and form.type == "json_schema" and form.json_schema is None:
            yield (
                "response_format",
                "response_format json_schema needs its json_schema",
                INVALID_CODE,
            )

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def top_logprobs_count(self) -> int | None:
        """The most likely tokens to return per position, or None: no log-probabilities."""
        return None

    @property
    def _guard(self) -> int | None:
        """The repetition guard asked for; none under a grammar unless asked for (JSON repeats
        its keys and punctuation)."""
        if self.no_repeat_ngram is None and self.response_format is not None:
            return None if self.response_format.type == "text" else 0
        return self.no_repeat_ngram

    def generation_config(self, base: GenerationConfig, max_tokens: int) -> GenerationConfig:
        """``base`` decoding as this request asks, ``max_tokens`` new tokens per choice at most;
        without a seed, a fresh one (OpenAI samples differently each time)."""
        return dataclasses.replace(
            base,
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed if self.seed is not None else secrets.randbits(62),
            stop=self.stops,
            no_repeat_ngram=self._guard,
            min_length=self.min_length,
            lambda_max=self.lambda_max,
            lambda_min=self.lambda_min,
            schedule=self.schedule,
            gu_horizon=self.gu_horizon,
            logprobs=self.top_logprobs_count,
            grammar=self.response_format.grammar if self.response_format else None,
        )


Tokens = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(Sampling):
    prompt: str | list[str] | Tokens | list[Tokens] = Field(
        description="text or token ids, or a list of them; sent as is (the adapter's template "
        "is not applied)"
    )
    max_tokens: int | None = Field(
        16, ge=0, description="new tokens per choice (0: none, to score the prompt with echo)"
    )
    echo: bool = Field(False, description="return the prompt before the completion")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log-probabilities of the tokens returned and of this many most likely ones",
    )
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: Any) -> Any:
        if prompt == [] or prompt == "":
            raise ValueError("the prompt must not be empty")
        if isinstance(prompt, list) and (
            empty := [i for i, p in enumerate(prompt) if p in ("", [])]
        ):
            raise ValueError(f"prompt {empty[0]} is empty")
        return prompt

    def refusals(self) -> Iterator[tuple[str, str, str]]:
        yield from super().refusals()
        if self.max_tokens == 0 and not self.echo:
            why = "max_tokens 0 returns nothing: send echo: true to score the prompt"
            yield "max_tokens", why, INVALID_CODE
        if self.best_of not in (None, 1):
            why = f"best_of above 1 {UNSUPPORTED}; send n for several choices"
            yield "best_of", why, UNSUPPORTED_CODE
        if self.suffix is not None:
            yield "suffix", f"suffix {UNSUPPORTED} (no fill-in-the-middle)", UNSUPPORTED_CODE

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. name; what the chat template reads

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice")
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' new name")
    logprobs: bool = Field(False, description="log-probabilities of the tokens returned")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="and of this many most likely ones (logprobs)"
    )
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # without tools, both mean none
    parallel_tool_calls: bool | None = None

    def refusals(self) -> Iterator[tuple[str, str, str]]:
        yield from super().refusals()
        if self.top_logprobs is not None and not self.logprobs:
            yield "top_logprobs", "top_logprobs needs logprobs: true", INVALID_CODE
        if self.tools:
            why = f"tools (function calling) {UNSUPPORTED}; send response_format json_schema"
            yield "tools", why, UNSUPPORTED_CODE

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Answer(BaseModel):
    """What every answer and streamed chunk carries."""

    id: str
    created: int
    model: str


class CompletionLogprobs(BaseModel):
    """The legacy completions' log-probabilities: per token returned, its text, its
    log-probability (None for the prompt's first), the most likely tokens' (with it) and its text
    offset (the running sum of the token texts' lengths, as vLLM reports it)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # PEMA: the adapter's kind and the prompt template it was trained with (None: the PLM).
    adapter_kind: str | None = None
    template: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
