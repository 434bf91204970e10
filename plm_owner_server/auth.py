"""Bearer API keys of the server's routes (the keys file: :mod:`shared.keys`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from plm_owner_server.errors import ApiError
from shared.keys import KeysFile, bearer_key, hash_key, new_key

__all__ = ["ANONYMOUS", "ApiKeys", "hash_key", "new_key"]
ANONYMOUS = "anonymous"
CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 6750: how to authenticate


class ApiKeys:
    """Maps key hashes to owner names; with no keys, everyone is ``anonymous``."""

    def __init__(self, hashes: dict[str, str], quotas: dict[str, int] | None = None) -> None:
        self._keys = KeysFile(hashes, quotas or {})
        self.quotas = self._keys.quotas  # owner name -> tokens per minute

    @property
    def open(self) -> bool:
        return not self._keys.owners

    @classmethod
    def from_file(cls, path: Path | None) -> ApiKeys:
        if path is None:
            return cls({})
        keys = KeysFile.read(path)
        return cls(keys.owners, keys.quotas)

    def owner(self, request: Request) -> str:
        """The caller's name, or a 401 for a missing or wrong key."""
        if self.open:
            return ANONYMOUS
        key = bearer_key(request.headers.get("authorization", ""))
        if key is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing API key; send the header 'Authorization: Bearer <key>'",
                headers=CHALLENGE,
            )
        owner = self._keys.owner_of(key)
        if owner is None:
            raise ApiError(
                401,
                "unauthorized",
                "invalid API key; ask the server's owner for one",
                headers=CHALLENGE,
            )
        return owner
