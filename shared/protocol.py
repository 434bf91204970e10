"""Pydantic models for every request and response of the `/v1` API.

Tensors travel as :class:`WireTensor`; bodies that carry them are msgpack
(``application/x-msgpack``), and JSON (bytes as base64) stays available for small requests.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    field_serializer,
    model_validator,
)

PROTOCOL_VERSION = "1"
MSGPACK = "application/x-msgpack"

WireDType = Literal["float32", "float16", "bfloat16", "int32"]
HiddenDType = Literal["float32", "float16", "bfloat16"]


def _integer(value: Any) -> Any:
    """An integer as JSON Schema means it: ``7`` or ``7.0``, never ``true`` or ``"7"`` (which
    pydantic's lax mode would turn into 1 and 7)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


Index = Annotated[int, Field(ge=0), BeforeValidator(_integer)]  # a token id, position or row
Count = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
# "none", "full" (all V logits per position) or k > 0 (top-k values and indices per position).
LogitsMode = Literal["none", "full"] | Count

ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}
TokenIds = Annotated[list[Index], Field(min_length=1)]


class WireModel(BaseModel):
    """Base for protocol models: unknown fields are rejected, bytes are base64 in JSON.

    JSON writes the standard alphabet (RFC 4648 section 4, what ``atob`` and ``b64decode``
    read) and reads both it and the URL-safe one.
    """

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class WireTensor(WireModel):
    """A tensor: little-endian, row-major bytes; bfloat16 is the upper 16 bits of float32."""

    dtype: WireDType
    shape: list[NonNegativeInt]
    data: bytes

    @field_serializer("data", when_used="json")
    def _standard_base64(self, data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    @model_validator(mode="after")
    def _size_matches(self) -> WireTensor:
        expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise ValueError(
                f"tensor data has {len(self.data)} bytes but {self.dtype} of shape "
                f"{self.shape} needs {expected}"
            )
        return self


class TopK(WireModel):
    """The k largest logits per position, in descending order, with their token ids (int32)."""

    values: WireTensor
    indices: WireTensor


class ErrorInfo(WireModel):
    code: str
    message: str
    detail: Any = None
    request_id: str | None = None  # also in the X-Request-ID header and the server's log line


class ErrorResponse(WireModel):
    """The one error shape of every 4xx/5xx answer."""

    error: ErrorInfo


class Health(WireModel):
    status: Literal["ok"] = "ok"


class Limits(WireModel):
    """What the server accepts; requests beyond these get a 4xx."""

    max_batch_size: int
    max_request_tokens: int
    max_body_bytes: int
    max_logits_values: int  # full-logit values (positions × V) in one answer
    max_new_tokens: int
    max_sessions_per_key: int
    session_ttl_s: float
    max_batch_tokens: int | None = None  # padded tokens of one scheduled iteration (absent: old)


class ModelInfo(WireModel):
    model_id: str
    architecture: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: str
    fingerprint: str
    protocol_version: str = PROTOCOL_VERSION
    head_shared: bool
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    limits: Limits


class HeadSpec(WireModel):
    """How to apply the exported head: ``logits = cap(scale * lm_head(project_out(norm(x))))``."""

    norm: Literal["layernorm", "rmsnorm", "none"]
    eps: float = 1e-5
    # Gemma's RMSNorm multiplies by (offset + weight) with offset 1.
    weight_offset: float = 0.0
    # Gemma 2/3: logits = cap * tanh(logits / cap).
    logit_softcap: float | None = None
    logit_scale: float = 1.0


def _check_starts(sequences: list[list[int]], start: list[int] | None) -> None:
    if start is None:
        return
    if len(start) != len(sequences):
        raise ValueError(f"start has {len(start)} entries but there are {len(sequences)} sequences")
    for b, (s, seq) in enumerate(zip(start, sequences, strict=True)):
        if not 0 <= s < len(seq):
            raise ValueError(f"start[{b}] = {s} must be in [0, {len(seq) - 1}] for its sequence")


class RepresentRequest(WireModel):
    """Representations of positions ``start[b] .. len-1`` of every sequence."""

    sequences: Annotated[list[TokenIds], Field(min_length=1)]
    start: list[Index] | None = None
    dtype: HiddenDType = "float32"
    logits: LogitsMode = "none"

    @model_validator(mode="after")
    def _starts_in_range(self) -> RepresentRequest:
        _check_starts(self.sequences, self.start)
        return self

    def starts(self) -> list[int]:
        return self.start if self.start is not None else [0] * len(self.sequences)


class RepresentResponse(WireModel):
    hidden: WireTensor
    # Row b's representations are hidden[offsets[b]:offsets[b + 1]].
    offsets: list[int]
    logits: WireTensor | TopK | None = None
    fingerprint: str


class SessionOpenRequest(WireModel):
    """Open a decoding session: the server keeps a KV cache of the prompts. ``positions: "all"``
    returns every prompt position's f(c), as ``/v1/represent`` would, from the same prefill."""

    sequences: Annotated[list[TokenIds], Field(min_length=1)]
    dtype: HiddenDType = "float32"
    logits: LogitsMode = "none"  # of each row's last position
    # None: "last". Optional fields default to None, which is never sent (shared.codec.pack), so
    # a request using none of them is one that servers older than them accept.
    positions: Literal["last", "all"] | None = None


class SessionOpenResponse(WireModel):
    session_id: str
    # Each row's last prompt position, [B, d]; with positions "all", every position of every
    # row, [N, d], row b being hidden[offsets[b]:offsets[b + 1]].
    hidden: WireTensor
    logits: WireTensor | TopK | None = None
    fingerprint: str
    offsets: list[int] | None = None  # with positions "all"


class SessionStepRequest(WireModel):
    """One token for each listed row; a row left out is finished and its cache is freed.

    With ``parents``, row ``k`` of the step (named ``rows[k]``, default ``k``) continues a copy
    of live row ``parents[k]``'s cache: a row may go on as several (beam search forks and
    reorders its hypotheses); every live row not listed as a parent is finished.
    """

    tokens: TokenIds
    rows: list[Index] | None = None
    parents: list[Index] | None = None
    logits: LogitsMode = "none"

    @model_validator(mode="after")
    def _rows_match_tokens(self) -> SessionStepRequest:
        for name in ("rows", "parents"):
            listed = getattr(self, name)
            if listed is not None and len(listed) != len(self.tokens):
                raise ValueError(
                    f"{name} has {len(listed)} entries but tokens has {len(self.tokens)}"
                )
        if self.rows is not None and len(set(self.rows)) != len(self.rows):
            raise ValueError("rows must not repeat a row")
        return self

    def step_rows(self, live: list[int]) -> list[int]:
        """The rows the step leaves in the session, in order."""
        if self.rows is not None:
            return self.rows
        return list(range(len(self.tokens))) if self.parents is not None else live


class SessionStepResponse(WireModel):
    hidden: WireTensor
    logits: WireTensor | TopK | None = None
