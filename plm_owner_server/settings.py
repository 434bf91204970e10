"""Server settings: command-line flags and ``PEMA_*`` environment variables fill one object."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import OptionalPath

EMBEDDED_MODEL = "smollm2-135m"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pema"


class Settings(BaseSettings):
    """Everything `pema-server` can be told; each field reads ``PEMA_<NAME>`` too."""

    model_config = SettingsConfigDict(env_prefix="PEMA_", env_file=".env", extra="ignore")

    model: str = Field(EMBEDDED_MODEL, description="Hugging Face id or folder; default: embedded")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="model engine: transformers (in process, the reference) or vllm (paged "
        "attention, prefix caching, tensor parallelism; needs the vllm extra: make vllm)",
    )
    tensor_parallel_size: int = Field(
        1, gt=0, description="vllm: processes (GPUs) the model is split over"
    )
    vllm_block_size: int = Field(
        32,
        gt=0,
        description="vllm: tokens per KV-cache block (a session step recomputes up to one block)",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, description="port to bind")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    api_keys_file: OptionalPath = Field(None, description="file of hashed API keys; none: open")
    insecure_no_auth: bool = Field(
        False, description="serve without API keys on a non-loopback address (refused otherwise)"
    )
    ssl_certfile: OptionalPath = Field(None, description="TLS certificate (PEM); with ssl_keyfile")
    ssl_keyfile: OptionalPath = Field(None, description="TLS private key (PEM)")
    share_head: bool = Field(True, description="serve the output head on /v1/head")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="embedded-model cache")
    max_batch_tokens: int = Field(
        16384,
        gt=0,
        description="padded tokens per scheduled iteration: of all keys' steps, and of their "
        "prefills while no session decodes",
    )
    prefill_chunk_tokens: int | None = Field(
        None,
        gt=0,
        description="prefill tokens (openings, /v1/represent) per scheduled iteration while "
        "sessions decode, so their steps wait behind at most one chunk; none: 512 on a GPU, 32 "
        "on a CPU (where a forward pass is compute-bound: 32 tokens cost about one decoding step)",
    )
    max_batch_size: int = Field(256, gt=0, description="sequences per request")
    max_request_tokens: int = Field(65536, gt=0, description="tokens per request")
    max_body_bytes: int = Field(64 * 2**20, gt=0, description="request body size")
    max_logits_values: int = Field(2**26, gt=0, description="full-logit values per response")
    max_new_tokens: int = Field(1024, gt=0, description="steps per generation session")
    max_sessions_per_key: int = Field(16, gt=0, description="open sessions per API key")
    session_ttl_s: float = Field(600.0, gt=0, description="idle seconds before a session expires")
    session_reclaim_s: float = Field(
        30.0,
        ge=0,
        description="a key at its session cap reclaims its least recently used session once "
        "that one is idle this long (so a crashed client's sessions never lock the key out)",
    )
    tokens_per_minute: int | None = Field(
        None, gt=0, description="token quota per key per minute (a keys-file line may set its own)"
    )
    max_kv_cache_mib: int = Field(4096, gt=0, description="KV-cache memory of all sessions (MiB)")
    log_level: str = Field("info", description="uvicorn log level")

    @property
    def max_kv_cache_bytes(self) -> int:
        return self.max_kv_cache_mib * 2**20
