"""``pema-client serve``'s settings: flags and ``PEMA_SERVE_*`` variables fill one object."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.keys import check_exposure
from shared.settings import OptionalPath


class ServeSettings(BaseSettings):
    """Everything ``pema-client serve`` can be told; each field reads ``PEMA_SERVE_<NAME>`` too
    (``PEMA_SERVE_ADAPTER`` as a JSON list)."""

    model_config = SettingsConfigDict(env_prefix="PEMA_SERVE_", extra="ignore")

    adapter: list[str] = Field(
        default_factory=list,
        description="NAME=DIR: serve the adapter in DIR as model NAME (repeat for several)",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8001, description="port to bind")
    api_keys_file: OptionalPath = Field(
        None, description="file of hashed keys this service accepts (pema-server's format)"
    )
    insecure_no_auth: bool = Field(
        False, description="serve without keys on a non-loopback address (refused otherwise)"
    )
    max_sessions: int = Field(
        8, gt=0, description="PLM server sessions open at once (within the key's allowance)"
    )
    max_tokens: int | None = Field(
        None, gt=0, description="most new tokens per choice (default: the PLM server's)"
    )
    reconnect_s: float = Field(
        5.0, ge=0, description="seconds a running request waits for a PLM server that went away"
    )
    device: str = Field("auto", description="where heads and adapters run: auto, cpu, cuda...")
    hidden_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="representations on the wire"
    )
    log_level: str = Field("info", description="uvicorn log level")

    def adapters(self) -> dict[str, Path]:
        """The ``NAME=DIR`` entries, checked."""
        named: dict[str, Path] = {}
        for entry in self.adapter:
            name, sep, folder = entry.partition("=")
            if not sep or not name.strip() or not folder.strip():
                raise ValueError(
                    f"--adapter {entry!r}: expected NAME=DIR, e.g. bible=adapters/bible"
                )
            if name in named:
                raise ValueError(f"--adapter: the name {name!r} is given twice")
            named[name] = Path(folder)
        return named

    def check_exposure(self) -> None:
        """No keys on a non-loopback address is refused unless asked for."""
        check_exposure(
            self.host,
            keyed=self.api_keys_file is not None,
            insecure_no_auth=self.insecure_no_auth,
            exposed="your adapters",
        )
