"""Field types both parties' settings share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator


def empty_is_none(value: object) -> object:
    """A variable set but empty (``PEMA_API_KEYS_FILE=``) means no path, not the current
    directory."""
    return None if value == "" else value


OptionalPath = Annotated[Path | None, BeforeValidator(empty_is_none)]
