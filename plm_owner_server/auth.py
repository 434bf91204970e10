"""Bearer API keys, stored as SHA-256 hashes (keys are random, so a plain hash is enough).

Keys file: one key per line, ``sha256:<hex> [name] [tokens_per_minute=N]``; ``#`` starts a
comment. Make a line with ``pema-server hash-key``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fastapi import Request

from plm_owner_server.errors import ApiError

ANONYMOUS = "anonymous"
CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 6750: how to authenticate
KEY_PREFIX = "pema_"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeys:
    """Maps key hashes to owner names; with no keys, everyone is ``anonymous``."""

    def __init__(self, hashes: dict[str, str], quotas: dict[str, int] | None = None) -> None:
        self._owners = hashes
        self.quotas = quotas or {}  # owner name -> tokens per minute

    @property
    def open(self) -> bool:
        return not self._owners

    @classmethod
    def from_file(cls, path: Path | None) -> ApiKeys:
        if path is None:
            return cls({})
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
        owners: dict[str, str] = {}
        quotas: dict[str, int] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            digest, options = fields[0], [f for f in fields[1:] if "=" in f]
            names = [f for f in fields[1:] if "=" not in f]
            if not (digest.startswith("sha256:") and len(digest) == 71) or len(names) > 1:
                raise ValueError(
                    f"{path}:{number}: expected 'sha256:<64 hex digits> [name] "
                    "[tokens_per_minute=N]'; make one with `pema-server hash-key`"
                )
            name = owners[digest] = names[0] if names else f"key-{digest[7:15]}"
            for option in options:
                key, _, value = option.partition("=")
                if key != "tokens_per_minute" or not value.isdigit() or int(value) < 1:
                    raise ValueError(
                        f"{path}:{number}: unknown option {option!r}; the one option is "
                        "tokens_per_minute=N with N ≥ 1"
                    )
                quotas[name] = int(value)
        if not owners:
            raise ValueError(f"the API keys file {path} holds no keys")
        return cls(owners, quotas)

    def owner(self, request: Request) -> str:
        """The caller's name, or a 401 for a missing or wrong key."""
        if self.open:
            return ANONYMOUS
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing API key; send the header 'Authorization: Bearer <key>'",
                headers=CHALLENGE,
            )
        digest, owner = hash_key(key.strip()), None
        for stored, name in self._owners.items():  # every entry, in constant time each
            if hmac.compare_digest(stored, digest):
                owner = name
        if owner is None:
            raise ApiError(
                401,
                "unauthorized",
                "invalid API key; ask the server's owner for one",
                headers=CHALLENGE,
            )
        return owner
