"""The OpenAI API's shapes that ``pema-client serve`` speaks: completions, chat completions (and
their streamed chunks), models and errors; PEMA's own settings are extra body fields."""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_owner_client.schedule import SCHEDULES

if TYPE_CHECKING:
    from data_owner_client.generate import GenerationConfig

FinishReason = Literal["stop", "length"]
Stop = Annotated[str, Field(min_length=1)]
UNSUPPORTED = "is not supported by pema-client serve"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What completions and chat completions share: OpenAI's sampling fields and PEMA's."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = None
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

    @model_validator(mode="after")
    def _supported(self) -> Sampling:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} {UNSUPPORTED}; leave it at 0")
        if self.logit_bias:
            raise ValueError(f"logit_bias {UNSUPPORTED}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

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
            no_repeat_ngram=self.no_repeat_ngram,
            min_length=self.min_length,
            lambda_max=self.lambda_max,
            lambda_min=self.lambda_min,
            schedule=self.schedule,
            gu_horizon=self.gu_horizon,
        )


Tokens = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(Sampling):
    prompt: str | list[str] | Tokens | list[Tokens] = Field(
        description="text or token ids, or a list of them; sent as is (the adapter's template "
        "is not applied)"
    )
    max_tokens: int | None = Field(16, ge=1, description="new tokens per choice")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo or self.logprobs is not None or self.suffix is not None:
            raise ValueError(f"echo, logprobs and suffix {UNSUPPORTED}")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of {UNSUPPORTED}")
        if self.prompt == [] or self.prompt == "":
            raise ValueError("prompt must not be empty")
        return self

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
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # without tools, both mean none
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatRequest:
        if self.logprobs or self.top_logprobs or self.tools:
            raise ValueError(f"logprobs and tools {UNSUPPORTED}")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError(f"response_format other than text {UNSUPPORTED}")
        return self

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


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


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
    logprobs: None = None


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
